//! Arbitrary bytes thrown at a whole server connection (handshake and
//! transmission parsers): the connection must end cleanly without a panic
//! or a hang, and a read-only export must not change.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use volumed_nbd::protocol::*;
use volumed_nbd::server::{serve_connection, ServerOptions};
use volumed_nbd::BlockDevice;

/// Feeds `input` to one server connection and returns once it ended.
fn run_session(exports: Arc<Exports>, input: Vec<u8>) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async move {
        let (client, server) = tokio::io::duplex(64 << 10);
        let opts = ServerOptions { handshake_timeout: Duration::from_secs(5), ..Default::default() };
        let serving = tokio::spawn(async move {
            serve_connection(server, "fuzz".into(), exports, &opts, std::future::pending()).await
        });
        let (mut rd, mut wr) = tokio::io::split(client);
        let drain = tokio::spawn(async move {
            let mut sink = Vec::new();
            let _ = rd.read_to_end(&mut sink).await;
        });
        let _ = wr.write_all(&input).await;
        let _ = wr.shutdown().await;
        let summary = tokio::time::timeout(Duration::from_secs(10), serving)
            .await
            .expect("server connection did not end")
            .expect("server connection panicked");
        drop(wr);
        let _ = tokio::time::timeout(Duration::from_secs(10), drain).await.expect("server output did not end");
        assert!(summary.duration < Duration::from_secs(10));
    });
}

/// A valid handshake that opens `export`, for fuzzing the request parser.
fn opening(export: &str) -> Vec<u8> {
    let mut v = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes().to_vec();
    v.extend_from_slice(&encode_option(OPT_GO, &encode_info_request(export, &[])));
    v
}

/// A request header with fuzzed fields, sometimes with a payload.
fn request_strategy() -> impl Strategy<Value = Vec<u8>> {
    (
        any::<u16>(),
        0u16..10,
        any::<u64>(),
        prop_oneof![0u64..(2 << 20), any::<u64>()],
        prop_oneof![0u32..70000, any::<u32>()],
    )
        .prop_map(|(flags, command, handle, offset, length)| {
            let mut v = Request { flags, command, handle, offset, length }.encode().to_vec();
            if command == CMD_WRITE && length <= 70000 {
                v.extend(std::iter::repeat_n(0x5a, length as usize));
            }
            v
        })
}

fn fixture() -> (tempfile::TempDir, std::path::PathBuf, Arc<Exports>) {
    let dir = tempfile::tempdir().unwrap();
    let disk = make_file(dir.path(), "ro.img", 1 << 20, true);
    let exports = Exports::with(vec![("ro", FileDevice::open(&disk, true) as Arc<dyn BlockDevice>)]);
    (dir, disk, Arc::new(exports))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn arbitrary_handshake_bytes(input in proptest::collection::vec(any::<u8>(), 0..512)) {
        let (_dir, disk, exports) = fixture();
        let before = file_bytes(&disk);
        run_session(exports, input);
        prop_assert!(file_bytes(&disk) == before);
    }

    #[test]
    fn arbitrary_options_after_valid_flags(
        options in proptest::collection::vec((0u32..14, proptest::collection::vec(any::<u8>(), 0..64)), 0..8),
        raw_tail in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let (_dir, disk, exports) = fixture();
        let before = file_bytes(&disk);
        let mut input = FLAG_C_FIXED_NEWSTYLE.to_be_bytes().to_vec();
        for (opt, data) in options {
            input.extend_from_slice(&encode_option(opt, &data));
        }
        input.extend_from_slice(&raw_tail);
        run_session(exports, input);
        prop_assert!(file_bytes(&disk) == before);
    }

    #[test]
    fn arbitrary_requests_on_a_read_only_export(
        requests in proptest::collection::vec(request_strategy(), 0..16),
        raw_tail in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let (_dir, disk, exports) = fixture();
        let before = file_bytes(&disk);
        let mut input = opening("ro");
        for r in requests {
            input.extend_from_slice(&r);
        }
        input.extend_from_slice(&raw_tail);
        run_session(exports, input);
        prop_assert!(file_bytes(&disk) == before, "a read-only export changed");
    }
}
