//! Every service compose runs, started as the real binary with exactly
//! the environment compose gives it, against a real PostgreSQL and Redis.
//!
//! The only changes to that environment are the `host:port` parts that
//! name other compose services (they become this test's PostgreSQL
//! database, a private Redis, a collector port nobody listens on, and the
//! other services' local ports) and the listen ports (free ones, so
//! replicas and parallel tests do not collide; hosts stay `0.0.0.0`). For
//! DATABASE_URL the user, password and database name go with the host,
//! since the compose ones exist only in compose's PostgreSQL.
//!
//! Then compose's `bootstrap` and `demo-agent` run their shell scripts the
//! same way, and the agent must register and come online through the
//! gateways.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use deploy_check::Env;
use deploy_check::binaries::Program;
use diesel::sql_query;
use diesel_async::{AsyncConnection, AsyncPgConnection, RunQueryDsl};
use test_support::RedisServer;

use crate::files::{compose, is_one_shot, switchyard_services};
use crate::support::{
    Process, authority_and_database, binaries_dir, built_binaries, free_port, host_port,
};
use test_support::EmptyDb;

/// The image's home directory, where compose mounts the agent's volumes.
const IMAGE_HOME: &str = "/var/lib/switchyard";

/// Compose `host:port` → the local `host:port` standing in for it.
struct Rewrites {
    addresses: BTreeMap<String, String>,
    database: String,
}

impl Rewrites {
    fn apply(&self, env: &Env) -> Env {
        env.iter()
            .map(|(key, value)| (key.clone(), self.rewrite(key, value)))
            .collect()
    }

    fn rewrite(&self, key: &str, value: &str) -> String {
        if key == "DATABASE_URL"
            && let Some((scheme, rest)) = value.split_once("://")
        {
            let (target, query) = rest
                .split_once('?')
                .map_or((rest, None), |(t, q)| (t, Some(q)));
            let server = target.rsplit_once('@').map_or(target, |(_, s)| s);
            let host_port = server.split('/').next().unwrap_or(server);
            if self.addresses.contains_key(host_port) {
                return match query {
                    Some(q) => format!("{scheme}://{}?{q}", self.database),
                    None => format!("{scheme}://{}", self.database),
                };
            }
        }
        let mut value = value.to_owned();
        for (from, to) in &self.addresses {
            value = replace_host_port(&value, from, to);
        }
        value
    }
}

/// Replaces `from` (a `host:port`) where it stands as a whole address.
fn replace_host_port(text: &str, from: &str, to: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(from) {
        let before = rest[..at].chars().next_back();
        let after = rest[at + from.len()..].chars().next();
        let whole = !before.is_some_and(part_of_name) && !after.is_some_and(|c| c.is_ascii_digit());
        out.push_str(&rest[..at]);
        out.push_str(if whole { to } else { from });
        rest = &rest[at + from.len()..];
    }
    out.push_str(rest);
    out
}

/// Whether `text` holds `<host>:<port>` as a whole address.
fn names_address_of(text: &str, host: &str) -> bool {
    let pattern = format!("{host}:");
    text.match_indices(&pattern).any(|(at, _)| {
        let before = text[..at].chars().next_back();
        let after = text[at + pattern.len()..].chars().next();
        !before.is_some_and(part_of_name) && after.is_some_and(|c| c.is_ascii_digit())
    })
}

fn part_of_name(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_')
}

struct Planned {
    name: String,
    program: Program,
    env: Env,
}

async fn applied_migrations(url: &str) -> i64 {
    #[derive(diesel::QueryableByName)]
    struct Count {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let mut conn = AsyncPgConnection::establish(url)
        .await
        .expect("connect to the test database");
    let count: Count = sql_query("SELECT count(*) AS n FROM __diesel_schema_migrations")
        .get_result(&mut conn)
        .await
        .expect("the migrations table exists after `job-api migrate`");
    count.n
}

async fn online_agents(url: &str, name: &str) -> i64 {
    #[derive(diesel::QueryableByName)]
    struct Count {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let mut conn = AsyncPgConnection::establish(url)
        .await
        .expect("connect to the test database");
    let count: Count =
        sql_query("SELECT count(*) AS n FROM agents WHERE name = $1 AND status = 'online'")
            .bind::<diesel::sql_types::Text, _>(name)
            .get_result(&mut conn)
            .await
            .expect("count online agents");
    count.n
}

fn failure(process: &Process, problem: &str) -> String {
    let log = process.log_text();
    let tail: Vec<&str> = log.lines().rev().take(30).collect();
    format!(
        "{}: {problem}; last log lines:\n{}",
        process.name,
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_compose_service_serves_with_its_compose_environment_and_stops_on_sigterm() {
    let started = Instant::now();
    let programs = Program::ALL;
    let binaries: BTreeMap<Program, PathBuf> = programs
        .into_iter()
        .zip(built_binaries(&programs))
        .collect();

    eprintln!("deploy-check: binaries ready after {:?}", started.elapsed());
    let compose = compose();
    let database = EmptyDb::create().await;
    let redis = RedisServer::start();
    let log_dir = std::env::temp_dir().join(format!(
        "switchyard-deploy-check-{}",
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::create_dir_all(&log_dir).expect("log directory");

    // Free ports for every listen address, remembered as the address other
    // containers use to reach that service (`<service>:<container port>`).
    let mut addresses = BTreeMap::from([
        ("postgres:5432".to_owned(), host_port(database.url())),
        (
            "redis:6379".to_owned(),
            redis.url().trim_start_matches("redis://").to_owned(),
        ),
        // No collector: exporting fails, which must not stop a service.
        (
            "otel-collector:4317".to_owned(),
            format!("127.0.0.1:{}", free_port()),
        ),
    ]);
    let mut planned = Vec::new();
    for (service, program) in switchyard_services(&compose) {
        if !program.is_service() || is_one_shot(&service.command) {
            continue;
        }
        let mut env = service.environment.clone();
        for variable in program.listen_variables() {
            let address: SocketAddr = env[*variable].parse().expect("listen address");
            let local = free_port();
            addresses.insert(
                format!("{}:{}", service.name, address.port()),
                format!("127.0.0.1:{local}"),
            );
            env.insert(
                (*variable).to_owned(),
                SocketAddr::new(address.ip(), local).to_string(),
            );
        }
        planned.push(Planned {
            name: service.name.clone(),
            program,
            env,
        });
    }
    let rewrites = Rewrites {
        addresses,
        database: authority_and_database(database.url()).to_owned(),
    };
    let resolve = |env: &Env| -> Env {
        let local = rewrites.apply(env);
        for (key, value) in &local {
            for host in compose.services.keys() {
                assert!(
                    !names_address_of(value, host),
                    "{key}={value} still points at compose's {host}"
                );
            }
        }
        local
    };

    // Migrations, as compose's `migrate` service runs them.
    let migrate = &compose.services["migrate"];
    let mut migration = Process::spawn(
        "migrate",
        &binaries[&Program::JobApi],
        &migrate.command[1..],
        &resolve(&migrate.environment),
        &log_dir,
    );
    let status = migration.wait(Duration::from_secs(60)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "{}",
        failure(&migration, &format!("exited {status:?}"))
    );
    let shipped = std::fs::read_dir(deploy_check::repo_root().join("migrations"))
        .expect("migrations directory")
        .filter(|e| e.as_ref().is_ok_and(|e| e.path().is_dir()))
        .count();
    assert_eq!(
        applied_migrations(database.url()).await,
        i64::try_from(shipped).expect("count"),
        "`job-api migrate` applied every migration to the empty database"
    );

    eprintln!("deploy-check: migrated after {:?}", started.elapsed());
    let mut running = Vec::new();
    for plan in &planned {
        let env = resolve(&plan.env);
        let ops = plan.program.ops_address_variable().expect("a service");
        let port = env[ops].parse::<SocketAddr>().expect("ops address").port();
        let process = Process::spawn(&plan.name, &binaries[&plan.program], &[], &env, &log_dir);
        running.push((process, format!("http://127.0.0.1:{port}/readyz")));
    }

    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .expect("http client");
    let deadline = Instant::now() + Duration::from_secs(40);
    for (process, readyz) in &mut running {
        loop {
            if let Some(status) = process.exited() {
                panic!(
                    "{}",
                    failure(process, &format!("exited {status} before ready"))
                );
            }
            let answer = client.get(readyz.as_str()).send().await;
            if answer.as_ref().is_ok_and(|r| r.status() == 200) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{}",
                failure(process, &format!("{readyz} never answered 200: {answer:?}"))
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    eprintln!("deploy-check: all ready after {:?}", started.elapsed());

    // The demo agent, registered the way compose does it: `bootstrap` asks
    // job-api for a registration token and leaves it in the shared volume,
    // then `demo-agent` registers with it and connects to the gateways.
    // Container paths under the image's home become a directory of this
    // test's, and PATH is the image's (its binaries are in /usr/local/bin).
    let home = log_dir.join("home");
    std::fs::create_dir_all(home.join("shared")).expect("shared volume");
    let localize = |text: &str| {
        rewrites
            .rewrite("", text)
            .replace(IMAGE_HOME, &home.to_string_lossy())
    };
    let image_path = format!("{}:/usr/local/bin:/usr/bin:/bin", binaries_dir().display());
    let shell_service = |name: &str| -> Process {
        let service = &compose.services[name];
        let mut env: Env = resolve(&service.environment)
            .into_iter()
            .map(|(k, v)| (k, localize(&v)))
            .collect();
        env.insert("PATH".to_owned(), image_path.clone());
        let command: Vec<String> = service.command.iter().map(|part| localize(part)).collect();
        assert_eq!(command[0], "sh", "{name} runs a shell script");
        Process::spawn(
            name,
            std::path::Path::new("sh"),
            &command[1..],
            &env,
            &log_dir,
        )
    };
    let mut bootstrap = shell_service("bootstrap");
    let status = bootstrap.wait(Duration::from_secs(30)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "{}",
        failure(&bootstrap, &format!("exited {status:?}"))
    );
    let mut agent = shell_service("demo-agent");
    let deadline = Instant::now() + Duration::from_secs(30);
    while online_agents(database.url(), "demo-agent").await == 0 {
        if let Some(status) = agent.exited() {
            panic!(
                "{}",
                failure(&agent, &format!("exited {status} before it was online"))
            );
        }
        assert!(
            Instant::now() < deadline,
            "{}",
            failure(&agent, "never came online")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "deploy-check: demo agent online after {:?}",
        started.elapsed()
    );
    agent.terminate();
    let status = agent.wait(Duration::from_secs(30)).await;
    assert!(
        status.is_some_and(|s| s.code() == Some(0)),
        "{}",
        failure(&agent, &format!("after SIGTERM: {status:?}"))
    );
    for (process, _) in &running {
        process.terminate();
    }
    for (process, _) in &mut running {
        let status = process.wait(Duration::from_secs(30)).await;
        assert!(
            status.is_some_and(|s| s.code() == Some(0)),
            "{}",
            failure(process, &format!("after SIGTERM: {status:?}"))
        );
    }

    // Compose asks for JSON logs; and the signing secret must never be logged.
    let secret = compose.services["job-api"].environment["AUTH_HS256_SECRET"].clone();
    assert!(!secret.is_empty());
    for (process, _) in &running {
        let log = process.log_text();
        assert!(
            !log.contains(&secret),
            "{} logged the HS256 secret",
            process.name
        );
        for line in log.lines().filter(|l| !l.trim().is_empty()) {
            assert!(
                serde_json::from_str::<serde_json::Value>(line).is_ok(),
                "{}: LOG_FORMAT=json, but a log line is not JSON: {line}",
                process.name
            );
        }
    }
    let _ = std::fs::remove_dir_all(&log_dir);
    eprintln!(
        "deploy-check: {} services started and stopped in {:?}",
        running.len(),
        started.elapsed()
    );
}

#[test]
fn host_ports_are_found_and_replaced_only_as_whole_addresses() {
    assert!(names_address_of("http://job-api:8080/x", "job-api"));
    assert!(names_address_of("redis:6379", "redis"));
    assert!(!names_address_of(
        "postgres://postgres:postgres@127.0.0.1:5432/db",
        "postgres"
    ));
    assert!(!names_address_of("http://my-job-api:8080", "job-api"));
    assert_eq!(
        replace_host_port(
            "http://job-api:8080,http://xjob-api:8080",
            "job-api:8080",
            "127.0.0.1:1"
        ),
        "http://127.0.0.1:1,http://xjob-api:8080"
    );
    assert_eq!(
        replace_host_port("redis://redis:63790", "redis:6379", "127.0.0.1:1"),
        "redis://redis:63790"
    );
}
