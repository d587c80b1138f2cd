//! The headers of the peer blob protocol (`p2p::protocol`): what one node reads from
//! another over the swarm, request and response alike.
#![no_main]
use agent::peers::p2p::protocol::{decode_request, decode_response, ticket_of, Response, MAX_HEADER};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = decode_request(data) {
        // An accepted request re-encodes within the header limit and decodes to itself.
        let json = serde_json::to_vec(&request).expect("requests serialize");
        assert!(json.len() <= MAX_HEADER.max(data.len()));
        assert_eq!(decode_request(&json).expect("round trip"), request);
    }
    if let Ok(response) = decode_response(data) {
        if let Response::Blob { len, offset, .. } = &response {
            // The body length a client computes (len - offset) never underflows.
            assert!(offset <= len, "{response:?}");
        }
        // An accepted data port ticket has its port and 32-byte values.
        let ticket = ticket_of(&response).expect("decode_response checked the ticket");
        assert_eq!(ticket.is_some(), matches!(response, Response::Direct { .. }));
    }
});
