//! The agent protocol, `switchyard.agent.v1` (`proto/switchyard/agent/v1/agent.proto`):
//! the generated messages, the `AgentGateway` client and server, and the
//! encoded descriptor set that the gateway serves through gRPC reflection.

pub mod v1 {
    tonic::include_proto!("switchyard.agent.v1");

    /// The encoded `FileDescriptorSet`, for `tonic-reflection`.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("agent_descriptor");
}

pub use v1::*;
