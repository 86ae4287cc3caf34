//! The handshake, taken over from the HTTP server: what is not a WebSocket
//! upgrade to `/v1/ws` gets a problem document, frames sent right behind the
//! request are not lost, and oversized client messages are refused.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use test_support::{TestDb, TestRedis};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::Role;

use crate::support::{Client, Incoming, start, token};

#[tokio::test(flavor = "multi_thread")]
async fn what_is_not_a_websocket_upgrade_to_v1_ws_gets_a_problem() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let service = start(&db, redis.url(), redis.prefix());

    // A plain GET: told to upgrade.
    let plain = reqwest::get(format!("{}/v1/ws", service.url()))
        .await
        .expect("get");
    assert_eq!(plain.status(), 426);
    assert_eq!(plain.headers()["upgrade"], "websocket");
    assert_eq!(
        plain.headers()["content-type"],
        service_kit::problem::CONTENT_TYPE
    );

    // A WebSocket upgrade elsewhere: 404, and no upgrade.
    let elsewhere = format!("ws://{}/v1/other", service.addr);
    match tokio_tungstenite::connect_async(elsewhere).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 404);
            assert_eq!(
                response.headers()["content-type"],
                service_kit::problem::CONTENT_TYPE
            );
        }
        other => panic!("expected 404, got {other:?}"),
    }

    // An upgrade without a key: 400 with the reason.
    let mut tcp = tokio::net::TcpStream::connect(service.addr)
        .await
        .expect("tcp");
    tcp.write_all(
        format!(
            "GET /v1/ws HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\r\n",
            service.addr
        )
        .as_bytes(),
    )
    .await
    .expect("write");
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut reply))
        .await
        .expect("reply and close in time")
        .expect("read");
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    assert!(reply.contains("connection: close"), "{reply}");
    assert!(reply.contains("bad-handshake"), "{reply}");

    // The service still serves both kinds.
    let mut client = Client::connect(&service, &token(&["acme"])).await;
    client
        .send(serde_json::json!({"type": "ping", "id": 1}))
        .await;
    assert!(matches!(
        client.next_within(Duration::from_secs(5)).await,
        Incoming::Frame(frame) if frame.kind == "pong"
    ));
}

/// A client may send its first frame in the same packet as the request; it
/// sits in the HTTP server's read buffer when the socket changes hands.
#[tokio::test(flavor = "multi_thread")]
async fn a_frame_sent_with_the_request_is_answered() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let service = start(&db, redis.url(), redis.prefix());

    let payload = br#"{"type":"ping","id":"early"}"#;
    let mask = [7u8, 1, 2, 9];
    let mut frame = vec![0x81, 0x80 | payload.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    let mut bytes = format!(
        "GET /v1/ws HTTP/1.1\r\nHost: {}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nAuthorization: Bearer {}\r\n\r\n",
        service.addr,
        token(&["acme"])
    )
    .into_bytes();
    bytes.extend_from_slice(&frame);
    let mut tcp = tokio::net::TcpStream::connect(service.addr)
        .await
        .expect("tcp");
    tcp.write_all(&bytes).await.expect("one write");

    // The response head, then whatever follows it is WebSocket.
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        tokio::time::timeout(Duration::from_secs(5), tcp.read_exact(&mut byte))
            .await
            .expect("head in time")
            .expect("read");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{head}"
    );
    let mut ws = WebSocketStream::from_raw_socket(tcp, Role::Client, None).await;
    let reply = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("a reply in time")
        .expect("open")
        .expect("frame");
    let Message::Text(text) = reply else {
        panic!("expected text, got {reply:?}");
    };
    let reply: serde_json::Value = serde_json::from_str(text.as_str()).expect("JSON");
    assert_eq!(reply["type"], "pong");
    assert_eq!(reply["id"], "early");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_message_over_64_kib_is_closed_with_1009() {
    let db = TestDb::new().await;
    let redis = TestRedis::new();
    let service = start(&db, redis.url(), redis.prefix());
    let mut client = Client::connect(&service, &token(&["acme"])).await;
    let padding = "x".repeat(70 * 1024);
    client
        .ws
        .send(Message::text(format!(
            r#"{{"type":"ping","id":"{padding}"}}"#
        )))
        .await
        .expect("send");
    assert!(matches!(
        client.next_within(Duration::from_secs(5)).await,
        Incoming::Closed(Some(1009))
    ));
}
