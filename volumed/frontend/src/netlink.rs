//! A small generic-netlink client: message encoder, reply decoder and a
//! blocking request/ack exchange. Only what the kernel NBD frontend needs.
//!
//! Layout (linux/netlink.h, linux/genetlink.h), native endian:
//! `nlmsghdr { u32 len; u16 type; u16 flags; u32 seq; u32 pid }`,
//! `genlmsghdr { u8 cmd; u8 version; u16 reserved }`,
//! then attributes `nlattr { u16 len; u16 type }` + payload, each padded to
//! 4 bytes.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};

use nix::sys::socket::{
    bind, recv, send, socket, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType,
};

pub(crate) const NLMSG_HDRLEN: usize = 16;
pub(crate) const GENL_HDRLEN: usize = 4;
pub(crate) const NLA_HDRLEN: usize = 4;

pub(crate) const NLMSG_ERROR: u16 = 2;
pub(crate) const NLMSG_DONE: u16 = 3;
pub(crate) const NLM_F_REQUEST: u16 = 0x1;
pub(crate) const NLM_F_ACK: u16 = 0x4;
const NLM_F_CAPPED: u16 = 0x100;
const NLM_F_ACK_TLVS: u16 = 0x200;
pub(crate) const NLA_F_NESTED: u16 = 0x8000;
const NLMSGERR_ATTR_MSG: u16 = 1;
const NETLINK_EXT_ACK: libc::c_int = 11;

pub(crate) const GENL_ID_CTRL: u16 = 0x10;
pub(crate) const CTRL_CMD_GETFAMILY: u8 = 3;
pub(crate) const CTRL_ATTR_FAMILY_ID: u16 = 1;
pub(crate) const CTRL_ATTR_FAMILY_NAME: u16 = 2;
const CTRL_VERSION: u8 = 2;

const fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Builds one generic-netlink request.
#[derive(Debug, Clone)]
pub(crate) struct GenlMessage {
    buf: Vec<u8>,
    nests: Vec<usize>,
}

impl GenlMessage {
    pub(crate) fn new(family: u16, cmd: u8, version: u8, flags: u16, seq: u32) -> Self {
        let mut buf = Vec::with_capacity(128);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, set by finish
        buf.extend_from_slice(&family.to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it
        buf.extend_from_slice(&[cmd, version, 0, 0]);
        GenlMessage { buf, nests: Vec::new() }
    }

    fn put(&mut self, ty: u16, payload: &[u8]) {
        let len = NLA_HDRLEN + payload.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(payload);
        self.buf.resize(align4(self.buf.len()), 0);
    }

    pub(crate) fn put_u32(&mut self, ty: u16, v: u32) -> &mut Self {
        self.put(ty, &v.to_ne_bytes());
        self
    }

    pub(crate) fn put_u64(&mut self, ty: u16, v: u64) -> &mut Self {
        self.put(ty, &v.to_ne_bytes());
        self
    }

    /// A NUL-terminated string attribute (NLA_STRING / NLA_NUL_STRING).
    pub(crate) fn put_str(&mut self, ty: u16, s: &str) -> &mut Self {
        let mut payload = Vec::with_capacity(s.len() + 1);
        payload.extend_from_slice(s.as_bytes());
        payload.push(0);
        self.put(ty, &payload);
        self
    }

    pub(crate) fn begin_nest(&mut self, ty: u16) -> &mut Self {
        self.nests.push(self.buf.len());
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf.extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
        self
    }

    pub(crate) fn end_nest(&mut self) -> &mut Self {
        if let Some(start) = self.nests.pop() {
            let len = (self.buf.len() - start) as u16;
            self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        }
        self
    }

    pub(crate) fn finish(mut self) -> Vec<u8> {
        while !self.nests.is_empty() {
            self.end_nest();
        }
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }
}

/// One decoded netlink message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NlMessage {
    pub ty: u16,
    pub flags: u16,
    pub seq: u32,
    pub payload: Vec<u8>,
}

/// Splits a datagram into messages.
pub(crate) fn parse_messages(mut buf: &[u8]) -> io::Result<Vec<NlMessage>> {
    let mut out = Vec::new();
    while buf.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes(buf[0..4].try_into().unwrap_or_default()) as usize;
        if len < NLMSG_HDRLEN || len > buf.len() {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "truncated netlink message"));
        }
        out.push(NlMessage {
            ty: u16::from_ne_bytes([buf[4], buf[5]]),
            flags: u16::from_ne_bytes([buf[6], buf[7]]),
            seq: u32::from_ne_bytes(buf[8..12].try_into().unwrap_or_default()),
            payload: buf[NLMSG_HDRLEN..len].to_vec(),
        });
        buf = &buf[align4(len).min(buf.len())..];
    }
    Ok(out)
}

/// Decodes attributes (type with flag bits masked off, payload).
pub(crate) fn parse_attrs(mut buf: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while buf.len() >= NLA_HDRLEN {
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let ty = u16::from_ne_bytes([buf[2], buf[3]]) & 0x3fff;
        if len < NLA_HDRLEN || len > buf.len() {
            break;
        }
        out.push((ty, &buf[NLA_HDRLEN..len]));
        buf = &buf[align4(len).min(buf.len())..];
    }
    out
}

pub(crate) fn attr_u32(payload: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(payload.get(..4)?.try_into().ok()?))
}

pub(crate) fn attr_u16(payload: &[u8]) -> Option<u16> {
    Some(u16::from_ne_bytes(payload.get(..2)?.try_into().ok()?))
}

/// An NLMSG_ERROR payload: 0 is an ack, otherwise `-errno` and maybe the
/// kernel's explanation (extended ack).
fn decode_error(msg: &NlMessage) -> Option<(i32, Option<String>)> {
    let code = i32::from_ne_bytes(msg.payload.get(..4)?.try_into().ok()?);
    let mut text = None;
    if msg.flags & NLM_F_ACK_TLVS != 0 {
        // Echoed request: only its header when capped.
        let echoed = if msg.flags & NLM_F_CAPPED != 0 {
            NLMSG_HDRLEN
        } else {
            msg.payload
                .get(4..8)
                .and_then(|b| b.try_into().ok())
                .map(|b| u32::from_ne_bytes(b) as usize)
                .unwrap_or(NLMSG_HDRLEN)
        };
        if let Some(tlvs) = msg.payload.get(4 + align4(echoed)..) {
            for (ty, val) in parse_attrs(tlvs) {
                if ty == NLMSGERR_ATTR_MSG {
                    let s = val.split(|b| *b == 0).next().unwrap_or_default();
                    text = Some(String::from_utf8_lossy(s).into_owned());
                }
            }
        }
    }
    Some((code, text))
}

static SEQ: AtomicU32 = AtomicU32::new(1);

pub(crate) fn next_seq() -> u32 {
    SEQ.fetch_add(1, Ordering::Relaxed)
}

/// A NETLINK_GENERIC socket used for one request at a time.
pub(crate) struct GenlSocket {
    fd: OwnedFd,
}

impl GenlSocket {
    pub(crate) fn open() -> io::Result<Self> {
        let fd = socket(AddressFamily::Netlink, SockType::Raw, SockFlag::SOCK_CLOEXEC, SockProtocol::NetlinkGeneric)?;
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0))?;
        // Ask for the kernel's error strings; old kernels lack the option.
        let on: libc::c_int = 1;
        // SAFETY: a valid socket, and a c_int option value of the right size.
        let _ = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_NETLINK,
                NETLINK_EXT_ACK,
                (&on as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        Ok(GenlSocket { fd })
    }

    /// Sends `msg` (built with NLM_F_REQUEST | NLM_F_ACK and sequence `seq`)
    /// and returns the payloads of the data replies once the kernel acks.
    pub(crate) fn request(&self, msg: &[u8], seq: u32) -> io::Result<Vec<NlMessage>> {
        send(self.fd.as_raw_fd(), msg, MsgFlags::empty())?;
        let mut replies = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::empty())?;
            for m in parse_messages(&buf[..n])? {
                if m.seq != seq {
                    continue;
                }
                match m.ty {
                    NLMSG_ERROR => {
                        let Some((code, text)) = decode_error(&m) else {
                            return Err(io::Error::new(io::ErrorKind::InvalidData, "short netlink error message"));
                        };
                        if code == 0 {
                            return Ok(replies);
                        }
                        let err = io::Error::from_raw_os_error(-code);
                        return Err(match text {
                            Some(t) => io::Error::new(err.kind(), format!("{err}: {t}")),
                            None => err,
                        });
                    }
                    NLMSG_DONE => return Ok(replies),
                    _ => replies.push(m),
                }
            }
        }
    }

    /// Resolves a generic-netlink family name to its id. `Ok(None)` when
    /// the kernel does not have the family (ENOENT).
    pub(crate) fn family_id(&self, name: &str) -> io::Result<Option<u16>> {
        let seq = next_seq();
        let msg = getfamily_message(name, seq);
        match self.request(&msg, seq) {
            Ok(replies) => {
                for r in &replies {
                    let attrs = r.payload.get(GENL_HDRLEN..).unwrap_or_default();
                    for (ty, val) in parse_attrs(attrs) {
                        if ty == CTRL_ATTR_FAMILY_ID {
                            return Ok(attr_u16(val));
                        }
                    }
                }
                Err(io::Error::new(io::ErrorKind::InvalidData, "CTRL_CMD_GETFAMILY reply without a family id"))
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

pub(crate) fn getfamily_message(name: &str, seq: u32) -> Vec<u8> {
    let mut m = GenlMessage::new(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, CTRL_VERSION, NLM_F_REQUEST | NLM_F_ACK, seq);
    m.put_str(CTRL_ATTR_FAMILY_NAME, name);
    m.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ne16(v: u16) -> [u8; 2] {
        v.to_ne_bytes()
    }
    fn ne32(v: u32) -> [u8; 4] {
        v.to_ne_bytes()
    }

    #[test]
    fn getfamily_layout() {
        let m = getfamily_message("nbd", 7);
        let mut want = Vec::new();
        want.extend_from_slice(&ne32(28)); // 16 + 4 + 8
        want.extend_from_slice(&ne16(GENL_ID_CTRL));
        want.extend_from_slice(&ne16(NLM_F_REQUEST | NLM_F_ACK));
        want.extend_from_slice(&ne32(7));
        want.extend_from_slice(&ne32(0));
        want.extend_from_slice(&[CTRL_CMD_GETFAMILY, 2, 0, 0]);
        want.extend_from_slice(&ne16(8)); // 4 + "nbd\0"
        want.extend_from_slice(&ne16(CTRL_ATTR_FAMILY_NAME));
        want.extend_from_slice(b"nbd\0");
        assert_eq!(m, want);
    }

    #[test]
    fn string_attr_is_padded() {
        let mut m = GenlMessage::new(0x20, 1, 1, NLM_F_REQUEST, 1);
        m.put_str(10, "abcde"); // 4 + 6 = 10 -> padded to 12
        m.put_u32(1, 5);
        let b = m.finish();
        assert_eq!(b.len(), 20 + 12 + 8);
        assert_eq!(&b[20..22], &ne16(10));
        assert_eq!(&b[24..30], b"abcde\0");
        assert_eq!(&b[30..32], &[0, 0]);
        assert_eq!(&b[32..34], &ne16(8));
    }

    #[test]
    fn nested_lengths_cover_children() {
        let mut m = GenlMessage::new(0x20, 1, 1, NLM_F_REQUEST, 1);
        m.begin_nest(7).begin_nest(1).put_u32(1, 42).end_nest();
        m.begin_nest(1).put_u32(1, 43).end_nest().end_nest();
        let b = m.finish();
        let attrs = parse_attrs(&b[20..]);
        assert_eq!(attrs.len(), 1);
        assert_eq!(attrs[0].0, 7);
        // Raw type carries the nested flag.
        assert_eq!(u16::from_ne_bytes([b[22], b[23]]), 7 | NLA_F_NESTED);
        let items = parse_attrs(attrs[0].1);
        assert_eq!(items.len(), 2);
        let fds: Vec<u32> = items.iter().map(|(_, p)| attr_u32(parse_attrs(p)[0].1).unwrap()).collect();
        assert_eq!(fds, vec![42, 43]);
    }

    #[test]
    fn decodes_ack_and_error_with_message() {
        // An ack: error 0 followed by the echoed header.
        let mut ack = Vec::new();
        ack.extend_from_slice(&ne32(36));
        ack.extend_from_slice(&ne16(NLMSG_ERROR));
        ack.extend_from_slice(&ne16(0));
        ack.extend_from_slice(&ne32(9));
        ack.extend_from_slice(&ne32(0));
        ack.extend_from_slice(&0i32.to_ne_bytes());
        ack.extend_from_slice(&[0u8; 16]);
        let msgs = parse_messages(&ack).unwrap();
        assert_eq!(msgs.len(), 1);
        assert_eq!(decode_error(&msgs[0]), Some((0, None)));

        // A capped error with an extended-ack message.
        let mut err = Vec::new();
        let text = b"nbd: bad size\0";
        let tlv_len = 4 + text.len();
        let total = 16 + 4 + 16 + align4(tlv_len);
        err.extend_from_slice(&ne32(total as u32));
        err.extend_from_slice(&ne16(NLMSG_ERROR));
        err.extend_from_slice(&ne16(NLM_F_CAPPED | NLM_F_ACK_TLVS));
        err.extend_from_slice(&ne32(9));
        err.extend_from_slice(&ne32(0));
        err.extend_from_slice(&(-libc::EINVAL).to_ne_bytes());
        err.extend_from_slice(&[0u8; 16]);
        err.extend_from_slice(&ne16(tlv_len as u16));
        err.extend_from_slice(&ne16(NLMSGERR_ATTR_MSG));
        err.extend_from_slice(text);
        err.resize(total, 0);
        let msgs = parse_messages(&err).unwrap();
        assert_eq!(decode_error(&msgs[0]), Some((-libc::EINVAL, Some("nbd: bad size".to_string()))));
    }

    #[test]
    fn truncated_message_is_an_error() {
        let mut b = Vec::new();
        b.extend_from_slice(&ne32(64));
        b.extend_from_slice(&[0u8; 12]);
        assert!(parse_messages(&b).is_err());
    }

    /// The control family always exists: resolving it exercises the real
    /// socket, request and reply path.
    #[test]
    fn resolves_real_families() {
        let sock = GenlSocket::open().unwrap();
        assert_eq!(sock.family_id("nlctrl").unwrap(), Some(GENL_ID_CTRL));
        assert_eq!(sock.family_id("vol-nofamily").unwrap(), None);
    }
}
