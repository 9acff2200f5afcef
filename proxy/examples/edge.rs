//! Runs the edge alone from a few arguments, for quick performance checks without the `marina`
//! binary (which also builds the control plane):
//!
//! ```text
//! edge <listen> <admin> <routes.json> <url-signing.pub.pem> <data dir> [<cookie key hex>]
//! ```
//!
//! Path mode, `public_url = http://<listen>`, replay store in memory. Stops on Ctrl-C / SIGTERM.

use marina_config::settings::PublicKeySetting;
use marina_config::Settings;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 5 {
        eprintln!(
            "usage: edge <listen> <admin> <routes.json> <pub.pem> <data dir> [<cookie key hex>]"
        );
        std::process::exit(2);
    }
    let mut s = Settings {
        data_dir: args[4].clone().into(),
        ..Settings::default()
    };
    s.proxy.listen = args[0].parse()?;
    s.proxy.admin_listen = args[1].parse()?;
    s.proxy.public_url = format!("http://{}", s.proxy.listen);
    s.proxy.routes_file = Some(args[2].clone().into());
    s.tokens.public_keys = vec![PublicKeySetting {
        kid: "k1".into(),
        file: args[3].clone().into(),
    }];
    if let Some(k) = args.get(5) {
        s.proxy.cookie.keys = vec![k.clone()];
    }
    s.validate()?;
    let listener = tokio::net::TcpListener::bind(s.proxy.listen).await?;
    let admin = tokio::net::TcpListener::bind(s.proxy.admin_listen).await?;
    let edge = marina_proxy::Edge::new(&s).await?;
    edge.serve(listener, admin, async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("signal handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    })
    .await?;
    Ok(())
}
