//! Deadlines for peers that stop making progress: a client that never finishes its request
//! body or never reads its response, an upstream that stops sending its response body. hyper
//! bounds only the time to a request's headers. The timers are armed only when a read or write
//! has to wait, so a request whose bytes are already there costs no timer at all.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::{Body, Frame, SizeHint};
use tokio::time::Sleep;

/// The error a body or connection ends with when its peer made no progress in time.
#[derive(Debug, thiserror::Error)]
#[error("no progress for {0:?}")]
pub struct Stalled(pub Duration);

/// Was `e`, or anything in its chain of sources, a [`Stalled`]?
pub fn is_stalled(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err.is::<Stalled>() {
            return true;
        }
        // io::Error's source() skips the error it wraps.
        if let Some(inner) = err
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref)
            && inner.is::<Stalled>()
        {
            return true;
        }
        cur = err.source();
    }
    false
}

/// A timer armed on the first wait and fired after `limit`.
struct Timer {
    limit: Duration,
    sleep: Option<Pin<Box<Sleep>>>,
}

impl Timer {
    fn new(limit: Duration) -> Timer {
        Timer { limit, sleep: None }
    }

    /// Called when the guarded operation returned Pending: true once the limit has passed.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        let limit = self.limit;
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        sleep.as_mut().poll(cx).is_ready()
    }

    fn disarm(&mut self) {
        self.sleep = None;
    }
}

/// How a [`Deadline`] body counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Count {
    /// From the last frame: long uploads and downloads are fine while data flows.
    Idle,
    /// From the first wait, never reset: for small bodies (the gateway's forms), which a client
    /// could otherwise trickle a byte at a time.
    Total,
}

/// A body that fails with [`Stalled`] when its frames stop coming.
pub struct Deadline<B> {
    inner: B,
    timer: Timer,
    count: Count,
}

impl<B> Deadline<B> {
    pub fn new(inner: B, limit: Duration, count: Count) -> Deadline<B> {
        Deadline {
            inner,
            timer: Timer::new(limit),
            count,
        }
    }
}

impl<B> Body for Deadline<B>
where
    B: Body + Unpin,
    B::Error: Into<axum::BoxError>,
{
    type Data = B::Data;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, axum::BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                if this.count == Count::Idle {
                    this.timer.disarm();
                }
                Poll::Ready(frame.map(|f| f.map_err(Into::into)))
            }
            Poll::Pending if this.timer.expired(cx) => {
                Poll::Ready(Some(Err(Stalled(this.timer.limit).into())))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A client connection whose writes fail with [`Stalled`] (closing it) when the client stops
/// reading for `limit`: otherwise a client that never reads its response holds the connection,
/// and the upstream connection feeding it, for good.
pub struct WriteDeadline<T> {
    io: T,
    timer: Timer,
}

impl<T> WriteDeadline<T> {
    pub fn new(io: T, limit: Duration) -> WriteDeadline<T> {
        WriteDeadline {
            io,
            timer: Timer::new(limit),
        }
    }

    /// Maps a write-side poll: disarms on progress, fails once the limit has passed waiting.
    fn guard<R>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<std::io::Result<R>>,
    ) -> Poll<std::io::Result<R>> {
        match polled {
            Poll::Ready(r) => {
                self.timer.disarm();
                Poll::Ready(r)
            }
            Poll::Pending if self.timer.expired(cx) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                Stalled(self.timer.limit),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: hyper::rt::Read + Unpin> hyper::rt::Read for WriteDeadline<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: hyper::rt::Write + Unpin> hyper::rt::Write for WriteDeadline<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.io).poll_write(cx, buf);
        this.guard(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.guard(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.io).poll_flush(cx);
        this.guard(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.io).poll_shutdown(cx);
        this.guard(cx, polled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::{BodyExt, StreamBody};

    /// A body that yields `chunks` frames `gap` apart, then ends.
    fn trickle(
        chunks: usize,
        gap: Duration,
    ) -> impl Body<Data = Bytes, Error = Infallible> + Unpin {
        let frames = futures_util::stream::unfold(0, move |i| async move {
            if i == chunks {
                return None;
            }
            tokio::time::sleep(gap).await;
            Some((Ok(Frame::data(Bytes::from_static(b"x"))), i + 1))
        });
        StreamBody::new(Box::pin(frames))
    }

    use std::convert::Infallible;

    #[tokio::test(start_paused = true)]
    async fn an_idle_deadline_allows_slow_bodies_that_keep_moving() {
        let body = Deadline::new(
            trickle(5, Duration::from_secs(20)),
            Duration::from_secs(30),
            Count::Idle,
        );
        let got = body
            .collect()
            .await
            .expect("frames 20 s apart, 30 s allowed");
        assert_eq!(got.to_bytes().len(), 5);
    }

    #[tokio::test(start_paused = true)]
    async fn a_total_deadline_ends_a_trickle() {
        let body = Deadline::new(
            trickle(5, Duration::from_secs(20)),
            Duration::from_secs(30),
            Count::Total,
        );
        let err = body
            .collect()
            .await
            .expect_err("100 s of trickle, 30 s allowed");
        assert!(is_stalled(err.as_ref()), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_body_fails_after_the_limit() {
        let started = tokio::time::Instant::now();
        let body = Deadline::new(
            trickle(2, Duration::from_secs(40)),
            Duration::from_secs(30),
            Count::Idle,
        );
        let err = body.collect().await.expect_err("40 s gap, 30 s allowed");
        assert!(is_stalled(err.as_ref()), "{err}");
        assert_eq!(started.elapsed(), Duration::from_secs(30));
    }

    #[tokio::test]
    async fn a_ready_body_arms_no_timer() {
        let mut body = Deadline::new(
            http_body_util::Full::new(Bytes::from_static(b"abc")),
            Duration::from_secs(1),
            Count::Total,
        );
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "abc");
        assert!(body.timer.sleep.is_none());
    }

    #[test]
    fn stalls_are_found_behind_other_errors() {
        let wrapped = std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            Stalled(Duration::from_secs(1)),
        );
        assert!(is_stalled(&wrapped));
        let other = std::io::Error::other("reset");
        assert!(!is_stalled(&other));
    }
}
