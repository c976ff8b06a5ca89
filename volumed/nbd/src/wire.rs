//! Stream helpers shared by the server and the client: payload reads into
//! `BytesMut` and batched vectored writes.

use std::io::{self, IoSlice};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Payloads at most this long are copied into the batch buffer; longer ones
/// go out as their own iovec (no copy).
const INLINE_MAX: usize = 2048;
/// Most iovecs handed to one `writev` (well under IOV_MAX).
const MAX_IOVECS: usize = 128;

/// Reads exactly `len` bytes into a fresh buffer. Buffered bytes are used
/// first; the rest is read straight into the result (a buffered reader
/// bypasses its own buffer for large reads).
pub(crate) async fn read_payload<R: AsyncRead + Unpin>(r: &mut R, len: usize) -> io::Result<Bytes> {
    let mut buf = BytesMut::with_capacity(len);
    while buf.len() < len {
        let want = len - buf.len();
        let n = r.read_buf(&mut (&mut buf).limit(want)).await?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed inside a payload"));
        }
    }
    Ok(buf.freeze())
}

/// Reads and drops `len` bytes.
pub(crate) async fn discard<R: AsyncRead + Unpin>(r: &mut R, len: u64) -> io::Result<()> {
    let copied = tokio::io::copy(&mut r.take(len), &mut tokio::io::sink()).await?;
    if copied < len {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed inside a payload"));
    }
    Ok(())
}

/// Replies (or requests) collected while the outgoing queue has more, then
/// written with as few `writev` calls as possible.
pub(crate) struct Batch {
    /// Headers and small payloads not yet cut into `segments`.
    staging: BytesMut,
    segments: Vec<Bytes>,
    bytes: usize,
}

impl Batch {
    pub(crate) fn new() -> Batch {
        Batch { staging: BytesMut::with_capacity(64 << 10), segments: Vec::with_capacity(64), bytes: 0 }
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.bytes == 0
    }

    /// Bytes queued.
    pub(crate) fn len(&self) -> usize {
        self.bytes
    }

    pub(crate) fn clear(&mut self) {
        self.staging.clear();
        self.segments.clear();
        self.bytes = 0;
    }

    pub(crate) fn push_slice(&mut self, b: &[u8]) {
        self.staging.extend_from_slice(b);
        self.bytes += b.len();
    }

    pub(crate) fn push_payload(&mut self, b: Bytes) {
        if b.len() <= INLINE_MAX {
            self.push_slice(&b);
            return;
        }
        self.cut_staging();
        self.bytes += b.len();
        self.segments.push(b);
    }

    fn cut_staging(&mut self) {
        if !self.staging.is_empty() {
            self.segments.push(self.staging.split().freeze());
        }
    }

    /// Writes everything queued and flushes the writer.
    pub(crate) async fn write_to<W: AsyncWrite + Unpin>(&mut self, w: &mut W) -> io::Result<()> {
        self.cut_staging();
        let result = if w.is_write_vectored() {
            write_vectored_all(w, &mut self.segments).await
        } else {
            let mut all = BytesMut::with_capacity(self.bytes);
            for s in &self.segments {
                all.put_slice(s);
            }
            w.write_all(&all).await
        };
        self.segments.clear();
        self.bytes = 0;
        // Reclaim the staging allocation once the frozen cuts are gone.
        self.staging.reserve(64 << 10);
        result?;
        w.flush().await
    }
}

async fn write_vectored_all<W: AsyncWrite + Unpin>(w: &mut W, segments: &mut [Bytes]) -> io::Result<()> {
    let mut first = 0;
    while first < segments.len() {
        let n = {
            let mut iov = [IoSlice::new(&[]); MAX_IOVECS];
            let mut count = 0;
            for s in segments[first..].iter().take(MAX_IOVECS) {
                iov[count] = IoSlice::new(s);
                count += 1;
            }
            w.write_vectored(&iov[..count]).await?
        };
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "peer stopped accepting data"));
        }
        let mut left = n;
        while left > 0 && first < segments.len() {
            let s = &mut segments[first];
            if s.len() <= left {
                left -= s.len();
                first += 1;
            } else {
                s.advance(left);
                left = 0;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that accepts at most `chunk` bytes per call, to exercise the
    /// partial-write bookkeeping.
    struct Trickle {
        out: Vec<u8>,
        chunk: usize,
        vectored: bool,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<io::Result<usize>> {
            let n = buf.len().min(self.chunk);
            self.out.extend_from_slice(&buf[..n]);
            std::task::Poll::Ready(Ok(n))
        }
        fn poll_write_vectored(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> std::task::Poll<io::Result<usize>> {
            let mut left = self.chunk;
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(left);
                self.out.extend_from_slice(&b[..take]);
                left -= take;
                n += take;
                if left == 0 {
                    break;
                }
            }
            std::task::Poll::Ready(Ok(n))
        }
        fn is_write_vectored(&self) -> bool {
            self.vectored
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn batch_survives_partial_writes() {
        for vectored in [true, false] {
            for chunk in [1, 7, 100, 5000, 1 << 20] {
                let mut expected = Vec::new();
                let mut batch = Batch::new();
                for i in 0..300u32 {
                    let hdr = i.to_be_bytes();
                    batch.push_slice(&hdr);
                    expected.extend_from_slice(&hdr);
                    let payload: Vec<u8> = (0..(i as usize * 37 % 9000)).map(|j| (i as usize + j) as u8).collect();
                    expected.extend_from_slice(&payload);
                    batch.push_payload(Bytes::from(payload));
                }
                assert_eq!(batch.len(), expected.len());
                let mut w = Trickle { out: Vec::new(), chunk, vectored };
                batch.write_to(&mut w).await.unwrap();
                assert!(batch.is_empty());
                assert_eq!(w.out, expected, "chunk {chunk} vectored {vectored}");
            }
        }
    }

    #[tokio::test]
    async fn read_payload_reads_exactly() {
        let data: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        let mut r = tokio::io::BufReader::with_capacity(1000, &data[..]);
        let a = read_payload(&mut r, 10).await.unwrap();
        let b = read_payload(&mut r, 50_000).await.unwrap();
        assert_eq!(&a[..], &data[..10]);
        assert_eq!(&b[..], &data[10..50_010]);
        discard(&mut r, 49_990).await.unwrap();
        assert!(read_payload(&mut r, 1).await.is_err());
    }
}
