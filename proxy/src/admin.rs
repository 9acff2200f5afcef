//! The admin listener: `/metrics` (Prometheus text), `/healthz` (the process serves) and
//! `/readyz` (routes are loaded). Separate from the edge listener so it is never exposed with it.

use std::convert::Infallible;
use std::sync::Arc;

use http::{header, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::forward::body::EdgeBody;
use crate::metrics::Metrics;
use crate::route::RouteTable;

fn answer(status: StatusCode, ctype: &'static str, body: String) -> Response<EdgeBody> {
    let mut r = Response::new(EdgeBody::full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(ctype),
    );
    r
}

fn route(req: &Request<Incoming>, metrics: &Metrics, routes: &RouteTable) -> Response<EdgeBody> {
    match req.uri().path() {
        "/metrics" => answer(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            metrics.render(),
        ),
        "/healthz" => answer(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" if routes.is_loaded() => answer(StatusCode::OK, "text/plain", "ready\n".into()),
        "/readyz" => answer(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "routes not loaded\n".into(),
        ),
        _ => answer(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

pub async fn serve(
    listener: TcpListener,
    metrics: &'static Metrics,
    routes: Arc<RouteTable>,
    mut stop: watch::Receiver<bool>,
) {
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.changed() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(_) => continue,
            },
        };
        let routes = routes.clone();
        let builder = builder.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let r = route(&req, metrics, &routes);
                async move { Ok::<_, Infallible>(r) }
            });
            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}
