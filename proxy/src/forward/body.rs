//! The response body type of the edge (`forward`'s, and every response's): either a small body the edge made itself, or the
//! notebook server's body streamed through frame by frame (never collected), optionally holding
//! a guard that counts an open event stream for as long as the body lives.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use crate::activity::StreamGuard;
use crate::metrics::Metrics;

use super::UpstreamBody;

/// The error of a body: the upstream failed mid-body (hyper then aborts the browser's
/// connection, so the browser sees a truncated response rather than a complete wrong one).
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

pub enum EdgeBody {
    /// A body the edge produced (error pages, redirects, metrics); `None` once sent.
    Full(Option<Bytes>),
    /// The upstream's body over an HTTP/1.1 browser connection's own upstream connection,
    /// read from the socket as it is polled (server-sent events are flushed per frame because
    /// hyper writes each data frame as soon as it is polled).
    Http1 {
        inner: UpstreamBody,
        /// Present for event streams (see `Upstream`).
        _guard: Option<StreamGuard>,
        metrics: &'static Metrics,
    },
    /// The upstream's body from hyper's pooled client (HTTP/2 browser connections).
    Upstream {
        inner: Incoming,
        /// Present for event streams: keeps the notebook's open-stream count up until the
        /// browser (or the upstream) ends the stream.
        _guard: Option<StreamGuard>,
        metrics: &'static Metrics,
    },
}

impl EdgeBody {
    pub fn full(b: impl Into<Bytes>) -> EdgeBody {
        EdgeBody::Full(Some(b.into()))
    }

    pub fn empty() -> EdgeBody {
        EdgeBody::Full(None)
    }
}

impl Body for EdgeBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        // Every variant is `Unpin` (`Incoming` is), so no pin projection is needed.
        let (r, metrics) = match self.get_mut() {
            EdgeBody::Full(b) => return Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            EdgeBody::Http1 { inner, metrics, .. } => {
                (inner.poll_frame(cx).map_err(BodyError::from), *metrics)
            }
            EdgeBody::Upstream { inner, metrics, .. } => (
                Pin::new(inner).poll_frame(cx).map_err(BodyError::from),
                *metrics,
            ),
        };
        if let Poll::Ready(Some(Ok(f))) = &r {
            if let Some(d) = f.data_ref() {
                metrics.bytes_to_client.inc_by(d.len() as u64);
            }
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        match self {
            EdgeBody::Full(b) => b.is_none(),
            EdgeBody::Http1 { inner, .. } => inner.is_end(),
            EdgeBody::Upstream { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            EdgeBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            EdgeBody::Full(None) => SizeHint::with_exact(0),
            EdgeBody::Http1 { inner, .. } => inner.size_hint(),
            EdgeBody::Upstream { inner, .. } => inner.size_hint(),
        }
    }
}
