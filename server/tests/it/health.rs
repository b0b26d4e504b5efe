//! `/healthz` and `/readyz` on the API listener, without a token: up, ready, and not ready while
//! the database cannot be reached (a real PostgreSQL cluster stopped and started again).

use crate::common::{Env, Server, wait_for};
use waypost_testkit::pg::Cluster;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// (status, body text) of a GET without a token.
fn get(server: &Server, path: &str) -> (u16, String) {
    rt().block_on(async {
        let (status, v) = server
            .api(None)
            .request(hyper::Method::GET, path, None)
            .await
            .unwrap();
        (status.as_u16(), v.to_string())
    })
}

#[test]
fn health_and_readiness_answer_without_a_token() {
    let server = Server::start(&[]);
    assert_eq!(get(&server, "/healthz").0, 200);
    let (status, body) = get(&server, "/readyz");
    assert_eq!(status, 200, "{body}");
    // Only those: everything else still needs a token (negative control).
    assert_eq!(get(&server, "/v1/server").0, 401);
    assert_eq!(get(&server, "/healthz/x").0, 401);
}

#[test]
fn readiness_follows_the_database() {
    let pg = Cluster::start();
    let url = pg.create_database();
    let server = Server::start_in(Env::with_database(&url), &[]);
    assert_eq!(get(&server, "/readyz").0, 200);
    pg.stop();
    let (status, body) = wait_for("readyz to say not ready", || {
        let r = get(&server, "/readyz");
        (r.0 == 503).then_some(r)
    });
    assert_eq!(status, 503);
    assert!(body.contains("database"), "{body}");
    assert_eq!(get(&server, "/healthz").0, 200, "the process is still up");
    pg.start_again();
    wait_for("readyz to say ready again", || {
        (get(&server, "/readyz").0 == 200).then_some(())
    });
}
