use std::process::ExitCode;

fn main() -> ExitCode {
    service_kit::launch::launch(
        |config: realtime_broadcaster::Config, shutdown| async move {
            let listener = service_kit::launch::bind("BROADCASTER_ADDR", config.addr)?;
            realtime_broadcaster::run(config, listener, shutdown).await
        },
    )
}
