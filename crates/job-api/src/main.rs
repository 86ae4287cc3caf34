use std::process::ExitCode;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    service_kit::launch::launch(|config: job_api::Config, shutdown| async move {
        let listener = service_kit::launch::bind("JOB_API_ADDR", config.addr)?;
        job_api::run(config, listener, shutdown).await
    })
}
