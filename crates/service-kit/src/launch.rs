//! Start-up shared by every service binary, so each `main.rs` is a few
//! lines: parse the command line, read the typed config (a bad variable
//! stops start-up with one line naming it, exit code 2), set up tracing,
//! apply migrations when asked, run until SIGTERM/SIGINT, exit 0.
//!
//! ```text
//! <service> [serve] [--migrate]   run (optionally migrating first)
//! <service> migrate               apply pending migrations and exit
//! ```

use std::future::Future;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::config::{CommonConfig, ConfigError, ProcessEnv, Source};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "A Switchyard service. Configuration comes from the environment; see the README."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Apply pending database migrations before serving (same as MIGRATE_ON_START=true).
    #[arg(long, global = true)]
    migrate: bool,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the service (the default).
    Serve,
    /// Apply pending database migrations, then exit.
    Migrate,
}

/// A service's configuration exposes the settings all services share.
pub trait ServiceConfig: Sized {
    fn from_source(source: &dyn Source) -> Result<Self, ConfigError>;
    fn common(&self) -> &CommonConfig;
}

/// Runs a service binary. `serve` binds its listeners from the config and
/// runs until the token is cancelled.
pub fn launch<C, F, Fut>(serve: F) -> ExitCode
where
    C: ServiceConfig,
    F: FnOnce(C, CancellationToken) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let cli = Cli::parse();
    let config = match C::from_source(&ProcessEnv) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let _telemetry = match telemetry::init(&config.common().telemetry) {
            Ok(guard) => guard,
            Err(error) => {
                eprintln!("error: configuration: {error}");
                return ExitCode::from(2);
            }
        };
        let service = config.common().telemetry.service_name;
        let migrate_only = matches!(cli.command, Some(Command::Migrate));
        if migrate_only || cli.migrate || config.common().migrate_on_start {
            match db::run_migrations(config.common().database.migration_url()).await {
                Ok(applied) => tracing::info!(applied, "database migrations up to date"),
                Err(error) => {
                    tracing::error!(error = %error, "migration failed");
                    return ExitCode::FAILURE;
                }
            }
            if migrate_only {
                return ExitCode::SUCCESS;
            }
        }
        tracing::info!(
            service,
            version = env!("CARGO_PKG_VERSION"),
            commit = crate::GIT_COMMIT,
            "starting"
        );
        match serve(config, crate::shutdown::on_signal()).await {
            Ok(()) => {
                tracing::info!(service, "stopped");
                ExitCode::SUCCESS
            }
            Err(error) => {
                tracing::error!(service, error = format!("{error:#}"), "failed");
                ExitCode::FAILURE
            }
        }
    })
}

/// The database, the bus and the operational endpoints, as every service
/// builds them.
#[derive(Clone)]
pub struct Foundation {
    pub db: db::Db,
    pub bus: bus::Bus,
    pub ops: crate::ops::Ops,
}

impl Foundation {
    pub fn new(common: &CommonConfig, version: &'static str) -> anyhow::Result<Self> {
        let db = db::Db::connect(&common.database)?;
        let bus = bus::Bus::connect(&common.redis)?;
        let ops = crate::ops::Ops::new(
            common.telemetry.service_name,
            version,
            vec![
                crate::ops::ReadinessCheck::postgres(db.clone()),
                crate::ops::ReadinessCheck::redis(bus.clone()),
            ],
        )
        .with_pool_metrics(db.clone());
        Ok(Self { db, bus, ops })
    }
}

/// Binds a listener, naming the variable in the error if it cannot.
pub fn bind(variable: &str, addr: std::net::SocketAddr) -> anyhow::Result<std::net::TcpListener> {
    std::net::TcpListener::bind(addr)
        .map_err(|e| anyhow::anyhow!("cannot listen on {variable}={addr}: {e}"))
}
