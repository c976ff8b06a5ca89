//! Hand-written malformed sessions against a live server over TCP: each gets
//! the error the protocol asks for or a clean close, other connections keep
//! working, and no rejected request changes a byte of the backing file.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use volumed_nbd::protocol::*;
use volumed_nbd::BlockDevice;

const SIZE: u64 = 1 << 20;
const T: Duration = Duration::from_secs(10);

struct Raw {
    s: TcpStream,
}

impl Raw {
    async fn connect(addr: std::net::SocketAddr) -> Raw {
        let s = TcpStream::connect(addr).await.unwrap();
        Raw { s }
    }

    /// Reads the greeting and sends the client flags.
    async fn greet(addr: std::net::SocketAddr, client_flags: u32) -> Raw {
        let mut r = Raw::connect(addr).await;
        let mut g = [0u8; GREETING_LEN];
        r.s.read_exact(&mut g).await.unwrap();
        assert_eq!(decode_greeting(&g).unwrap(), FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        r.s.write_all(&client_flags.to_be_bytes()).await.unwrap();
        r
    }

    async fn option(&mut self, option: u32, data: &[u8]) {
        self.s.write_all(&encode_option(option, data)).await.unwrap();
    }

    async fn option_reply(&mut self) -> (OptionReplyHeader, Vec<u8>) {
        let mut h = [0u8; OPTION_REPLY_HEADER_LEN];
        tokio::time::timeout(T, self.s.read_exact(&mut h)).await.unwrap().unwrap();
        let h = decode_option_reply_header(&h).unwrap();
        let mut data = vec![0u8; h.length as usize];
        self.s.read_exact(&mut data).await.unwrap();
        (h, data)
    }

    /// NBD_OPT_GO to `export`; returns (size, flags).
    async fn go(addr: std::net::SocketAddr, export: &str) -> (Raw, u64, u16) {
        let mut r = Raw::greet(addr, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;
        r.option(OPT_GO, &encode_info_request(export, &[INFO_BLOCK_SIZE])).await;
        let mut export_info = None;
        loop {
            let (h, data) = r.option_reply().await;
            match h.reply_type {
                REP_INFO => {
                    if let Info::Export { size, flags } = decode_info(&data).unwrap() {
                        export_info = Some((size, flags));
                    }
                }
                REP_ACK => break,
                other => panic!("unexpected reply {}", reply_type_name(other)),
            }
        }
        let (size, flags) = export_info.unwrap();
        (r, size, flags)
    }

    async fn request(&mut self, command: u16, flags: u16, handle: u64, offset: u64, length: u32, payload: &[u8]) {
        let mut b = BytesMut::new();
        b.extend_from_slice(&Request { flags, command, handle, offset, length }.encode());
        b.extend_from_slice(payload);
        self.s.write_all(&b).await.unwrap();
    }

    async fn reply(&mut self) -> SimpleReply {
        let mut h = [0u8; SIMPLE_REPLY_LEN];
        tokio::time::timeout(T, self.s.read_exact(&mut h)).await.unwrap().unwrap();
        SimpleReply::decode(&h).unwrap()
    }

    async fn read_data(&mut self, len: usize) -> Vec<u8> {
        let mut d = vec![0u8; len];
        tokio::time::timeout(T, self.s.read_exact(&mut d)).await.unwrap().unwrap();
        d
    }

    /// The server closes the connection (EOF or reset), possibly after
    /// sending `allowed` more bytes.
    async fn expect_closed(&mut self) {
        let mut buf = [0u8; 4096];
        loop {
            match tokio::time::timeout(T, self.s.read(&mut buf)).await.expect("server did not close the connection") {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    disk: std::path::PathBuf,
    ro_disk: std::path::PathBuf,
    before: Vec<u8>,
    ro_before: Vec<u8>,
    server: TestServer,
}

async fn fixture() -> Fixture {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let disk = make_file(dir.path(), "vol.img", SIZE, true);
    let ro_disk = make_file(dir.path(), "ro.img", SIZE, true);
    let mut exports = Exports::with(vec![
        ("vol", FileDevice::open(&disk, false) as Arc<dyn BlockDevice>),
        ("ro", FileDevice::open(&ro_disk, true) as Arc<dyn BlockDevice>),
    ]);
    exports.policy.insert("fenced".into());
    exports.unavailable.insert("leaderless".into());
    let server = TestServer::start(Arc::new(exports)).await;
    Fixture { before: file_bytes(&disk), ro_before: file_bytes(&ro_disk), _dir: dir, disk, ro_disk, server }
}

impl Fixture {
    /// Another connection still works end to end.
    async fn still_serving(&self) {
        let (mut r, size, _) = Raw::go(self.server.addr, "vol").await;
        assert_eq!(size, SIZE);
        r.request(CMD_READ, 0, 77, 4096, 512, &[]).await;
        let rep = r.reply().await;
        assert_eq!((rep.handle, rep.error), (77, NBD_OK));
        let data = r.read_data(512).await;
        assert_eq!(&data[..], &file_bytes(&self.disk)[4096..4608]);
        r.request(CMD_DISC, 0, 0, 0, 0, &[]).await;
        r.expect_closed().await;
    }

    fn unchanged(&self) {
        assert!(file_bytes(&self.disk) == self.before, "the writable backing file changed");
        assert!(file_bytes(&self.ro_disk) == self.ro_before, "the read-only backing file changed");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_instead_of_client_flags_closes() {
    let f = fixture().await;
    let mut r = Raw::connect(f.server.addr).await;
    let mut g = [0u8; GREETING_LEN];
    r.s.read_exact(&mut g).await.unwrap();
    r.s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    r.expect_closed().await;
    f.still_serving().await;
    f.unchanged();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_without_fixed_newstyle_is_refused() {
    let f = fixture().await;
    let mut r = Raw::greet(f.server.addr, 0).await;
    r.expect_closed().await;
    f.still_serving().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_option_magic_closes() {
    let f = fixture().await;
    let mut r = Raw::greet(f.server.addr, FLAG_C_FIXED_NEWSTYLE).await;
    r.s.write_all(&[0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0, 0, 0, 0, 7, 0, 0, 0, 0]).await.unwrap();
    r.expect_closed().await;
    f.still_serving().await;
    f.unchanged();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_handshakes_do_not_disturb_the_server() {
    let f = fixture().await;
    // Hang up after two bytes of client flags, in the middle of an option
    // header, and in the middle of option data.
    let mut r = Raw::connect(f.server.addr).await;
    r.s.write_all(&[0, 0]).await.unwrap();
    drop(r);
    let mut r = Raw::greet(f.server.addr, FLAG_C_FIXED_NEWSTYLE).await;
    r.s.write_all(&IHAVEOPT.to_be_bytes()[..5]).await.unwrap();
    drop(r);
    let mut r = Raw::greet(f.server.addr, FLAG_C_FIXED_NEWSTYLE).await;
    let opt = encode_option(OPT_GO, &encode_info_request("vol", &[]));
    r.s.write_all(&opt[..opt.len() - 3]).await.unwrap();
    drop(r);
    f.still_serving().await;
    f.unchanged();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn option_errors_are_answered_and_haggling_continues() {
    let f = fixture().await;
    let mut r = Raw::greet(f.server.addr, FLAG_C_FIXED_NEWSTYLE).await;

    for opt in [0x1234u32, OPT_STRUCTURED_REPLY, OPT_STARTTLS, OPT_LIST_META_CONTEXT, OPT_EXTENDED_HEADERS] {
        r.option(opt, &[]).await;
        let (h, msg) = r.option_reply().await;
        assert_eq!((h.option, h.reply_type), (opt, REP_ERR_UNSUP), "{}", String::from_utf8_lossy(&msg));
    }

    // Unknown, policy-refused and leaderless exports.
    for (name, want) in [("nope", REP_ERR_UNKNOWN), ("fenced", REP_ERR_POLICY), ("leaderless", REP_ERR_SHUTDOWN)] {
        r.option(OPT_GO, &encode_info_request(name, &[])).await;
        let (h, msg) = r.option_reply().await;
        assert_eq!(h.reply_type, want, "{name}: {}", String::from_utf8_lossy(&msg));
        assert!(String::from_utf8_lossy(&msg).contains(name));
    }

    // Malformed GO data: name length beyond the data, trailing junk.
    let mut bad = encode_info_request("vol", &[]);
    bad[3] = 200;
    r.option(OPT_GO, &bad).await;
    assert_eq!(r.option_reply().await.0.reply_type, REP_ERR_INVALID);
    let mut bad = encode_info_request("vol", &[]);
    bad.push(9);
    r.option(OPT_INFO, &bad).await;
    assert_eq!(r.option_reply().await.0.reply_type, REP_ERR_INVALID);

    // NBD_OPT_LIST with data is invalid; without, it lists.
    r.option(OPT_LIST, b"x").await;
    assert_eq!(r.option_reply().await.0.reply_type, REP_ERR_INVALID);
    r.option(OPT_LIST, &[]).await;
    let mut names = Vec::new();
    loop {
        let (h, data) = r.option_reply().await;
        match h.reply_type {
            REP_SERVER => names.push(decode_server_entry(&data).unwrap().name),
            REP_ACK => break,
            other => panic!("unexpected {}", reply_type_name(other)),
        }
    }
    assert_eq!(names, ["ro", "vol"]);

    // Oversize option data is skipped and refused.
    r.option(0x99, &vec![7u8; 100 << 10]).await;
    assert_eq!(r.option_reply().await.0.reply_type, REP_ERR_TOO_BIG);

    // INFO then GO still work on the same connection.
    r.option(OPT_INFO, &encode_info_request("vol", &[INFO_NAME])).await;
    let mut saw_name = false;
    loop {
        let (h, data) = r.option_reply().await;
        match h.reply_type {
            REP_INFO => {
                if decode_info(&data).unwrap() == Info::Name("vol".into()) {
                    saw_name = true;
                }
            }
            REP_ACK => break,
            other => panic!("unexpected {}", reply_type_name(other)),
        }
    }
    assert!(saw_name);
    r.option(OPT_GO, &encode_info_request("vol", &[])).await;
    loop {
        let (h, _) = r.option_reply().await;
        if h.reply_type == REP_ACK {
            break;
        }
        assert_eq!(h.reply_type, REP_INFO);
    }
    r.request(CMD_FLUSH, 0, 1, 0, 0, &[]).await;
    assert_eq!(r.reply().await.error, NBD_OK);
    f.unchanged();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_option_length_closes() {
    let f = fixture().await;
    let mut r = Raw::greet(f.server.addr, FLAG_C_FIXED_NEWSTYLE).await;
    let mut hdr = IHAVEOPT.to_be_bytes().to_vec();
    hdr.extend_from_slice(&OPT_GO.to_be_bytes());
    hdr.extend_from_slice(&u32::MAX.to_be_bytes());
    r.s.write_all(&hdr).await.unwrap();
    r.expect_closed().await;
    f.still_serving().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_name_and_abort() {
    let f = fixture().await;
    // NBD_OPT_EXPORT_NAME of an unknown export: no error reply exists, so close.
    let mut r = Raw::greet(f.server.addr, FLAG_C_FIXED_NEWSTYLE).await;
    r.option(OPT_EXPORT_NAME, b"nope").await;
    r.expect_closed().await;

    // Known export, without NO_ZEROES: size, flags and 124 zero bytes.
    let mut r = Raw::greet(f.server.addr, FLAG_C_FIXED_NEWSTYLE).await;
    r.option(OPT_EXPORT_NAME, b"ro").await;
    let mut b = [0u8; 10 + EXPORT_NAME_PADDING];
    r.s.read_exact(&mut b).await.unwrap();
    assert_eq!(u64::from_be_bytes(b[..8].try_into().unwrap()), SIZE);
    let flags = u16::from_be_bytes([b[8], b[9]]);
    assert_ne!(flags & TFLAG_READ_ONLY, 0);
    assert!(b[10..].iter().all(|&x| x == 0));
    r.request(CMD_READ, 0, 5, 0, 8, &[]).await;
    assert_eq!(r.reply().await.error, NBD_OK);
    assert_eq!(r.read_data(8).await, f.ro_before[..8]);

    // ABORT is acknowledged, then the server closes.
    let mut r = Raw::greet(f.server.addr, FLAG_C_FIXED_NEWSTYLE).await;
    r.option(OPT_ABORT, &[]).await;
    let (h, _) = r.option_reply().await;
    assert_eq!((h.option, h.reply_type), (OPT_ABORT, REP_ACK));
    r.expect_closed().await;
    f.still_serving().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_errors_and_change_nothing() {
    let f = fixture().await;
    let (mut r, size, flags) = Raw::go(f.server.addr, "vol").await;
    assert_eq!(size, SIZE);
    assert_eq!(flags & TFLAG_READ_ONLY, 0);

    let junk = vec![0xabu8; 4096];
    // (command, flags, offset, length, payload, expected error)
    type Case<'a> = (u16, u16, u64, u32, &'a [u8], u32);
    let cases: Vec<Case> = vec![
        (CMD_READ, 0, SIZE - 512, 1024, &[], NBD_EINVAL),        // read past end
        (CMD_READ, 0, u64::MAX - 10, 512, &[], NBD_EINVAL),      // offset overflow
        (CMD_WRITE, 0, SIZE - 1024, 4096, &junk, NBD_ENOSPC),    // write past end
        (CMD_WRITE, 0, u64::MAX - 100, 4096, &junk, NBD_ENOSPC), // write offset overflow
        (CMD_WRITE_ZEROES, 0, SIZE, 512, &[], NBD_ENOSPC),       // zeroes past end
        (CMD_TRIM, 0, SIZE - 512, 4096, &[], NBD_EINVAL),        // trim past end
        (CMD_READ, 0, 0, 0, &[], NBD_EINVAL),                    // zero length
        (CMD_WRITE, 0, 0, 0, &[], NBD_EINVAL),                   // zero-length write
        (CMD_TRIM, 0, 0, 0, &[], NBD_EINVAL),                    // zero-length trim
        (CMD_READ, 0, 0, (32 << 20) + 1, &[], NBD_EINVAL),       // oversize read
        (0x77, 0, 0, 512, &[], NBD_EINVAL),                      // unknown command
        (CMD_CACHE, 0, 0, 512, &[], NBD_EINVAL),                 // not advertised
        (CMD_BLOCK_STATUS, 0, 0, 512, &[], NBD_EINVAL),          // not negotiated
        (CMD_WRITE, 0x4000, 0, 4096, &junk, NBD_EINVAL),         // unknown flag, payload skipped
        (CMD_WRITE, CMD_FLAG_NO_HOLE, 0, 4096, &junk, NBD_EINVAL), // NO_HOLE on write
        (CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 0, 4096, &[], NBD_ENOTSUP), // fast zero never offered
    ];
    for (i, (cmd, fl, off, len, payload, want)) in cases.iter().enumerate() {
        let handle = 1000 + i as u64;
        r.request(*cmd, *fl, handle, *off, *len, payload).await;
        let rep = r.reply().await;
        assert_eq!(rep.handle, handle, "case {i}");
        assert_eq!(rep.error, *want, "case {i}: got {}", errno_name(rep.error));
    }
    // The stream is still in sync: a good read returns the right bytes.
    r.request(CMD_READ, 0, 9, SIZE - 512, 512, &[]).await;
    let rep = r.reply().await;
    assert_eq!((rep.handle, rep.error), (9, NBD_OK));
    assert_eq!(r.read_data(512).await, f.before[(SIZE - 512) as usize..]);
    f.unchanged();

    // Read-only export: every write-type request is EPERM, payload consumed.
    let (mut r, _, flags) = Raw::go(f.server.addr, "ro").await;
    assert_ne!(flags & TFLAG_READ_ONLY, 0);
    r.request(CMD_WRITE, 0, 1, 0, 4096, &junk).await;
    assert_eq!(r.reply().await.error, NBD_EPERM);
    r.request(CMD_WRITE, CMD_FLAG_FUA, 2, 8192, 4096, &junk).await;
    assert_eq!(r.reply().await.error, NBD_EPERM);
    r.request(CMD_TRIM, 0, 3, 0, 4096, &[]).await;
    assert_eq!(r.reply().await.error, NBD_EPERM);
    r.request(CMD_WRITE_ZEROES, 0, 4, 0, 4096, &[]).await;
    assert_eq!(r.reply().await.error, NBD_EPERM);
    r.request(CMD_READ, 0, 5, 0, 4096, &[]).await;
    assert_eq!(r.reply().await.error, NBD_OK);
    assert_eq!(r.read_data(4096).await, f.ro_before[..4096]);
    f.unchanged();
    f.still_serving().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_write_is_refused_and_closes() {
    let f = fixture().await;
    let (mut r, _, _) = Raw::go(f.server.addr, "vol").await;
    r.request(CMD_WRITE, 0, 42, 0, (32 << 20) + 512, &vec![1u8; 64 << 10]).await;
    let rep = r.reply().await;
    assert_eq!((rep.handle, rep.error), (42, NBD_EINVAL));
    r.expect_closed().await;
    f.still_serving().await;
    f.unchanged();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_request_magic_closes_after_pending_replies() {
    let f = fixture().await;
    let (mut r, _, _) = Raw::go(f.server.addr, "vol").await;
    r.request(CMD_READ, 0, 1, 0, 512, &[]).await;
    r.s.write_all(&[0u8; REQUEST_LEN]).await.unwrap();
    // The read accepted before the garbage is still answered.
    let rep = r.reply().await;
    assert_eq!((rep.handle, rep.error), (1, NBD_OK));
    assert_eq!(r.read_data(512).await, f.before[..512]);
    r.expect_closed().await;
    f.still_serving().await;
    f.unchanged();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_waits_for_in_flight_requests() {
    let f = fixture().await;
    let (mut r, _, _) = Raw::go(f.server.addr, "vol").await;
    let data = random_bytes(64 << 10);
    let mut b = BytesMut::new();
    for i in 0..16u64 {
        b.extend_from_slice(
            &Request { flags: 0, command: CMD_WRITE, handle: i, offset: i * 65536, length: 65536 }.encode(),
        );
        b.extend_from_slice(&data);
    }
    b.extend_from_slice(&Request { flags: 0, command: CMD_DISC, handle: 99, offset: 0, length: 0 }.encode());
    r.s.write_all(&b).await.unwrap();
    let mut seen = std::collections::HashSet::new();
    for _ in 0..16 {
        let rep = r.reply().await;
        assert_eq!(rep.error, NBD_OK);
        seen.insert(rep.handle);
    }
    assert_eq!(seen.len(), 16);
    r.expect_closed().await;
    let now = file_bytes(&f.disk);
    for i in 0..16usize {
        assert!(now[i * 65536..(i + 1) * 65536] == data[..], "block {i}");
    }
}
