//! Properties of the upload handler's input: any multipart body, read through axum's own
//! extractor, is read under the limits or refused with a 4xx; any set of parts is validated or
//! refused, and what is accepted holds only safe module paths and no secret value. The committed
//! corpus's multipart bodies (testdata/hostile/corpus.json) replay the first property.

use axum::extract::{FromRequest, Multipart, Request};
use bytes::Bytes;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use serde_json::json;

use super::envelope::ApiError;
use super::limits::Limits;
use super::upload::{read_parts, validate, Part};
use crate::worker::names::check_module_path;

const BOUNDARY: &str = "b0undary";

fn limits() -> Limits {
    Limits { max_upload_bytes: 4096, max_modules: 3, max_module_bytes: 64, requests_per_minute: 0 }
}

/// Pieces of a multipart body: mostly well-formed framing with hostile names and contents, plus
/// raw bytes, so bodies are sometimes valid, sometimes cut, sometimes nonsense.
fn piece() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        4 => (
            prop_oneof!["(?s).{0,12}", Just("metadata".to_owned()), Just("../x.js".to_owned())],
            prop::option::of("[a-z/+;= -]{0,30}"),
            prop::collection::vec(any::<u8>(), 0..100),
        )
            .prop_map(|(name, content_type, body)| {
                let mut part = format!(
                    "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{name}\"\r\n"
                )
                .into_bytes();
                if let Some(content_type) = content_type {
                    part.extend(format!("Content-Type: {content_type}\r\n").into_bytes());
                }
                part.extend(b"\r\n");
                part.extend(body);
                part.extend(b"\r\n");
                part
            }),
        1 => Just(format!("--{BOUNDARY}--\r\n").into_bytes()),
        1 => prop::collection::vec(any::<u8>(), 0..40),
    ]
}

fn read(body: Vec<u8>) -> Result<Vec<Part>, ApiError> {
    let request = Request::builder()
        .method("PUT")
        .header("content-type", format!("multipart/form-data; boundary={BOUNDARY}"))
        .body(axum::body::Body::from(body))
        .map_err(|e| ApiError::Invalid(e.to_string()))?;
    let runtime = tokio::runtime::Builder::new_current_thread().build().expect("a runtime");
    runtime.block_on(async {
        let mut multipart =
            Multipart::from_request(request, &()).await.map_err(|e| ApiError::Invalid(e.body_text()))?;
        read_parts(&mut multipart, &limits()).await
    })
}

fn is_client_error(error: &ApiError) -> bool {
    matches!(error, ApiError::Invalid(_) | ApiError::TooLarge(_))
}

/// Read under the limits, or refused with a 4xx.
fn check_body(body: Vec<u8>) -> Result<(), TestCaseError> {
    match read(body) {
        Ok(parts) => {
            let modules = parts.iter().filter(|p| p.name != "metadata").count();
            prop_assert!(modules <= limits().max_modules);
            for part in parts.iter().filter(|p| p.name != "metadata") {
                prop_assert!(part.bytes.len() <= limits().max_module_bytes);
            }
        }
        Err(error) => prop_assert!(is_client_error(&error), "{:?}", error),
    }
    Ok(())
}

#[test]
fn the_committed_multipart_corpus_is_read_under_the_limits_or_refused() {
    let bodies = crate::worker::hostile_input_tests::corpus("multipart");
    let mut read_whole = 0;
    for body in &bodies {
        let body = body.as_str().expect("a body").as_bytes().to_vec();
        check_body(body.clone()).unwrap_or_else(|e| panic!("{:?}: {e}", String::from_utf8_lossy(&body)));
        read_whole += usize::from(read(body).is_ok());
    }
    // Some bodies must get through the reader, or the corpus only tests the framing.
    assert!(read_whole >= 2 && read_whole < bodies.len(), "{read_whole} of {} read", bodies.len());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: crate::hostile_input_cases(), ..ProptestConfig::default() })]

    #[test]
    fn any_multipart_body_is_read_under_the_limits_or_refused(pieces in prop::collection::vec(piece(), 0..8)) {
        check_body(pieces.concat())?;
    }

    #[test]
    fn any_parts_are_validated_or_refused_and_store_no_secret(
        modules in prop::collection::vec(
            (prop_oneof!["(?s).{0,12}", "[a-z./]{1,10}\\.js"], prop::option::of("[a-z/+;= -]{0,30}")),
            0..4,
        ),
        main in prop_oneof!["(?s).{0,8}", "[a-z]{1,6}\\.js"],
        secret_value in prop::option::of("(?s).{0,12}"),
        var in "(?s).{0,12}",
        script in "(?s).{0,8}|[a-z0-9-]{1,8}",
    ) {
        let mut bindings = vec![json!({"name": "V", "type": "plain_text", "text": var})];
        let mut secret = json!({"name": "S", "type": "secret_text"});
        if let Some(value) = &secret_value {
            secret["text"] = json!(value);
        }
        bindings.push(secret);
        let metadata = json!({"main_module": main, "compatibility_date": "2024-09-23", "bindings": bindings});
        let mut parts = vec![Part { name: "metadata".into(), content_type: None, bytes: Bytes::from(metadata.to_string()) }];
        for (name, content_type) in modules {
            parts.push(Part { name, content_type, bytes: Bytes::from_static(b"export default {}") });
        }
        match validate(&script, parts, &limits()) {
            Ok(upload) => {
                prop_assert!(secret_value.is_none(), "a secret value was accepted");
                for path in upload.modules.keys() {
                    prop_assert!(check_module_path(path).is_ok(), "{:?}", path);
                }
                let stored = upload.metadata.to_string();
                prop_assert!(!stored.contains("secret_text"), "secret bindings are not stored: {}", stored);
            }
            Err(error) => prop_assert!(is_client_error(&error), "{:?}", error),
        }
    }
}
