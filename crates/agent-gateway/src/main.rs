use std::process::ExitCode;

fn main() -> ExitCode {
    service_kit::launch::launch(|config: agent_gateway::Config, shutdown| async move {
        let listener = service_kit::launch::bind("GATEWAY_HTTP_ADDR", config.addr)?;
        agent_gateway::run(config, listener, shutdown).await
    })
}
