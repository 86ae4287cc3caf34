//! Repositories: org-scoped CRUD with unique names.

use db::DbError;
use domain::org::RepositorySpec;
use domain::{DomainError, RepositoryId};
use test_support::TestDb;

use crate::support::{self, acme, job};

fn spec(name: &str) -> RepositorySpec {
    RepositorySpec {
        name: name.to_owned(),
        url: Some(format!("https://git.example.com/{name}.git")),
        max_concurrent_jobs: Some(4),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn repositories_can_be_created_read_listed_updated_and_deleted() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let org = acme(&mut conn).await;

    let web = db::repositories::create(&mut conn, &org, &spec("web"))
        .await
        .expect("create web");
    let api = db::repositories::create(&mut conn, &org, &spec("api"))
        .await
        .expect("create api");

    assert_eq!(web.org_id, "acme");
    assert_eq!(web.name, "web");
    assert_eq!(web.url.as_deref(), Some("https://git.example.com/web.git"));
    assert_eq!(web.max_concurrent_jobs, Some(4));
    let id = RepositoryId(web.id);
    assert_eq!(
        db::repositories::get(&mut conn, &org, id)
            .await
            .expect("get"),
        web
    );
    let names: Vec<_> = db::repositories::list(&mut conn, &org)
        .await
        .expect("list")
        .into_iter()
        .map(|r| r.name)
        .collect();
    assert_eq!(names, ["api", "web"], "listed by name");

    let changed = RepositorySpec {
        name: "frontend".into(),
        url: None,
        max_concurrent_jobs: None,
    };
    let updated = db::repositories::update(&mut conn, &org, id, &changed)
        .await
        .expect("update");

    assert_eq!((updated.id, updated.name.as_str()), (web.id, "frontend"));
    assert_eq!((updated.url, updated.max_concurrent_jobs), (None, None));
    assert!(updated.updated_at >= web.updated_at);
    assert_eq!(updated.created_at, web.created_at);

    db::repositories::delete(&mut conn, &org, id)
        .await
        .expect("delete");

    assert!(matches!(
        db::repositories::get(&mut conn, &org, id).await,
        Err(DbError::NotFound)
    ));
    assert!(matches!(
        db::repositories::delete(&mut conn, &org, id).await,
        Err(DbError::NotFound)
    ));
    assert_eq!(
        db::repositories::list(&mut conn, &org).await.expect("list"),
        [api]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_duplicate_repository_name_in_one_org_is_a_conflict() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let org = acme(&mut conn).await;
    let globex = support::org(&mut conn, "globex").await;
    db::repositories::create(&mut conn, &org, &spec("web"))
        .await
        .expect("create");
    let api = db::repositories::create(&mut conn, &org, &spec("api"))
        .await
        .expect("create");

    let duplicate = db::repositories::create(&mut conn, &org, &spec("web")).await;
    let renamed_onto =
        db::repositories::update(&mut conn, &org, RepositoryId(api.id), &spec("web")).await;
    let elsewhere = db::repositories::create(&mut conn, &globex, &spec("web")).await;

    assert!(
        matches!(duplicate, Err(DbError::Conflict(_))),
        "got {duplicate:?}"
    );
    assert!(
        matches!(renamed_onto, Err(DbError::Conflict(_))),
        "got {renamed_onto:?}"
    );
    assert!(
        elsewhere.is_ok(),
        "names are unique per org only: {elsewhere:?}"
    );
    assert_eq!(
        db::repositories::get(&mut conn, &org, RepositoryId(api.id))
            .await
            .expect("get")
            .name,
        "api"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn another_orgs_repository_is_not_found() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let org = acme(&mut conn).await;
    let globex = support::org(&mut conn, "globex").await;
    let web = db::repositories::create(&mut conn, &org, &spec("web"))
        .await
        .expect("create");
    let id = RepositoryId(web.id);

    let got = db::repositories::get(&mut conn, &globex, id).await;
    let updated = db::repositories::update(&mut conn, &globex, id, &spec("stolen")).await;
    let deleted = db::repositories::delete(&mut conn, &globex, id).await;

    assert!(matches!(got, Err(DbError::NotFound)), "got {got:?}");
    assert!(matches!(updated, Err(DbError::NotFound)), "got {updated:?}");
    assert!(matches!(deleted, Err(DbError::NotFound)), "got {deleted:?}");
    assert!(
        db::repositories::list(&mut conn, &globex)
            .await
            .expect("list")
            .is_empty()
    );
    assert_eq!(
        db::repositories::get(&mut conn, &org, id)
            .await
            .expect("still there"),
        web
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_invalid_repository_spec_is_refused() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let org = acme(&mut conn).await;
    let bad = RepositorySpec {
        max_concurrent_jobs: Some(0),
        ..spec("web")
    };

    let result = db::repositories::create(&mut conn, &org, &bad).await;

    assert!(
        matches!(result, Err(DbError::Domain(DomainError::Invalid(_)))),
        "got {result:?}"
    );
    assert!(
        db::repositories::list(&mut conn, &org)
            .await
            .expect("list")
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn deleting_a_repository_detaches_its_jobs() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    let org = acme(&mut conn).await;
    let web = db::repositories::create(&mut conn, &org, &spec("web"))
        .await
        .expect("create");
    let mut new = job("build web");
    new.repository_id = Some(RepositoryId(web.id));
    let created = support::create_one(&mut conn, &org, new).await;
    assert_eq!(created.repository_id, Some(web.id));

    db::repositories::delete(&mut conn, &org, RepositoryId(web.id))
        .await
        .expect("delete");

    let job = support::reload(&mut conn, created.job_id()).await;
    assert_eq!(
        job.repository_id, None,
        "the job survives without its repository"
    );
}

/// The insert's foreign key catches a repository deleted after a create
/// checked it: the same invalid-field answer as the check, not a 500.
#[tokio::test(flavor = "multi_thread")]
async fn a_job_naming_a_repository_deleted_meanwhile_is_invalid_input() {
    let test_db = TestDb::new().await;
    let mut conn = test_db.conn().await;
    acme(&mut conn).await;
    let inserted = diesel_async::RunQueryDsl::execute(
        diesel::sql_query(
            "INSERT INTO jobs (id, org_id, repository_id, queue, status, payload, retry_policy) \
             VALUES (gen_random_uuid(), 'acme', gen_random_uuid(), 'default', 'queued', '{}', '{}')",
        ),
        &mut conn,
    )
    .await
    .map_err(DbError::from);
    match inserted {
        Err(DbError::Domain(DomainError::Invalid(fields))) => {
            assert_eq!(fields[0].field, "repository_id");
        }
        other => panic!("expected an invalid repository_id, got {other:?}"),
    }
}
