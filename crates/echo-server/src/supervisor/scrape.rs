//! Asking the workers' admin listeners, and merging what they answer.
//!
//! Each worker serves `/metrics` and `/readyz` on `127.0.0.1:0`; the
//! supervisor asks them over HTTP/1.1 (hyper's client, one connection per
//! request: a scrape every few seconds does not need pooling) and serves
//! one exposition in which every sample carries a `worker="N"` label.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper_util::rt::TokioIo;

/// How long one worker may take to answer before the supervisor answers
/// without it.
pub(crate) const ASK_TIMEOUT: Duration = Duration::from_secs(2);

/// GET `path` from `addr`: (status, body).
pub(crate) async fn get(addr: SocketAddr, path: &str) -> Result<(u16, Bytes), String> {
    let exchange = async {
        let stream = tokio::net::TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
        tokio::task::spawn_local(connection);
        let request = Request::get(path)
            .header(hyper::header::HOST, addr.to_string())
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let response = sender.send_request(request).await.map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok((status, body))
    };
    tokio::time::timeout(ASK_TIMEOUT, exchange)
        .await
        .map_err(|_| format!("no answer within {ASK_TIMEOUT:?}"))?
}

/// One metric family of an exposition: its `# HELP`/`# TYPE`/`# UNIT`
/// lines, then its samples.
#[derive(Debug, Default)]
struct Family {
    header: Vec<String>,
    samples: Vec<String>,
}

/// Merges the expositions of several workers, `(worker, text)`, into one
/// (without the final `# EOF`): each family once, with every worker's
/// samples under it, each labelled `worker="N"`. OpenMetrics wants a
/// family's samples together, so they are grouped, not concatenated.
pub(crate) fn merge(expositions: &[(u16, String)]) -> String {
    let mut families: Vec<Family> = Vec::new();
    for (worker, text) in expositions {
        let mut current: Option<usize> = None;
        let mut header = Vec::new();
        for line in text.lines() {
            if line.is_empty() || line == "# EOF" {
                continue;
            }
            if line.starts_with('#') {
                if current.is_some() {
                    current = None;
                    header.clear();
                }
                header.push(line.to_owned());
                continue;
            }
            let index = match current {
                Some(index) => index,
                None => {
                    let index = match families.iter().position(|f| f.header == header) {
                        Some(index) => index,
                        None => {
                            families.push(Family { header: header.clone(), samples: Vec::new() });
                            families.len() - 1
                        }
                    };
                    current = Some(index);
                    index
                }
            };
            families[index].samples.push(labelled(line, *worker));
        }
    }
    let mut out = String::new();
    for family in families {
        for line in family.header.iter().chain(&family.samples) {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// A sample line with `worker="N"` as its first label.
fn labelled(sample: &str, worker: u16) -> String {
    // A metric name never holds '{' or ' ': the first of them ends it.
    match sample.find(['{', ' ']) {
        Some(at) if sample[at..].starts_with("{}") => {
            format!("{}{{worker=\"{worker}\"}}{}", &sample[..at], &sample[at + 2..])
        }
        Some(at) if sample[at..].starts_with('{') => {
            format!("{}{{worker=\"{worker}\",{}", &sample[..at], &sample[at + 1..])
        }
        Some(at) => format!("{}{{worker=\"{worker}\"}}{}", &sample[..at], &sample[at..]),
        None => sample.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_labelled_by_worker_and_grouped_by_family() {
        let a = "# HELP up Up.\n# TYPE up gauge\nup 1\n# HELP req Requests.\n# TYPE req counter\n\
                 req_total{path=\"/\"} 3\nreq_created 1.5\n# EOF\n";
        let b = "# HELP up Up.\n# TYPE up gauge\nup 0\n# HELP req Requests.\n# TYPE req counter\n\
                 req_total{path=\"/\"} 4\nreq_created 2.5\n# EOF\n";
        let merged = merge(&[(0, a.to_owned()), (1, b.to_owned())]);
        assert_eq!(
            merged,
            "# HELP up Up.\n# TYPE up gauge\nup{worker=\"0\"} 1\nup{worker=\"1\"} 0\n\
             # HELP req Requests.\n# TYPE req counter\nreq_total{worker=\"0\",path=\"/\"} 3\n\
             req_created{worker=\"0\"} 1.5\nreq_total{worker=\"1\",path=\"/\"} 4\nreq_created{worker=\"1\"} 2.5\n"
        );
    }

    #[test]
    fn a_family_only_one_worker_has_is_kept() {
        let a = "# TYPE x gauge\nx 1\n";
        let b = "# TYPE x gauge\nx 2\n# TYPE y gauge\ny{} 3\n";
        let merged = merge(&[(0, a.to_owned()), (1, b.to_owned())]);
        assert_eq!(
            merged,
            "# TYPE x gauge\nx{worker=\"0\"} 1\nx{worker=\"1\"} 2\n# TYPE y gauge\ny{worker=\"1\"} 3\n"
        );
    }
}
