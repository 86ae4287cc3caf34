use std::process::ExitCode;

use service_kit::launch::bind;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    service_kit::launch::launch(|config: agent_gateway::Config, shutdown| async move {
        let listeners = agent_gateway::Listeners {
            grpc: bind("GATEWAY_GRPC_ADDR", config.grpc_addr)?,
            http: bind("GATEWAY_HTTP_ADDR", config.http_addr)?,
        };
        agent_gateway::run(config, listeners, shutdown).await
    })
}
