use std::process::ExitCode;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    service_kit::launch::launch(|config: scheduler::Config, shutdown| async move {
        let listener = service_kit::launch::bind("SCHEDULER_HTTP_ADDR", config.addr)?;
        scheduler::run(config, listener, shutdown).await
    })
}
