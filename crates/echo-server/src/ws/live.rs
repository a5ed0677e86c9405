//! What the page loads besides itself, from the WebSocket port: the
//! server's live figures as JSON ([`STATS_PATH`]) and MQTT.js for its MQTT
//! tab ([`MQTT_JS_PATH`]).
//!
//! On this port rather than the admin one, so that the page works with the
//! admin port off, and so that putting the page behind a proxy does not
//! mean opening `/metrics` (every counter, by label) to browsers: the JSON
//! holds only the few aggregate figures the page shows, those of the `info`
//! stats line (`crate::stats`). Served as the page is: GET and HEAD, with
//! the HTTP echo on or off; other methods are echoed like any request when
//! the echo is on, and get 405 when it is off.
//!
//! Cheap, since it runs on the one event loop: the JSON is built at most
//! once per sample (a second), from memory, never from `/proc` per
//! request; the script is a `'static` slice of the binary.

use std::borrow::Cow;

use super::handshake::Response;
use crate::stats::Live;

/// The live figures, as JSON (same style as `/.ws` and `/.sse`).
pub(crate) const STATS_PATH: &str = "/.stats";

/// MQTT.js, vendored (`vendor/README.md` has its version and origin).
pub(crate) const MQTT_JS_PATH: &str = "/.ws/mqtt.min.js";

static MQTT_JS: &[u8] = include_bytes!("vendor/mqtt.min.js");

/// One of the page's resources.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Resource {
    Stats,
    MqttJs,
}

/// The resource a request target (path, maybe a query) names, if any.
pub(crate) fn resource(target: &str) -> Option<Resource> {
    match target.split(['?', '#']).next() {
        Some(STATS_PATH) => Some(Resource::Stats),
        Some(MQTT_JS_PATH) => Some(Resource::MqttJs),
        _ => None,
    }
}

/// The answer to a GET (or, with `head_only`, a HEAD) for `resource`.
pub(crate) fn response(resource: Resource, head_only: bool, live: &Live) -> Response {
    let mut response = match resource {
        // `no-store`, like every answer but the script's.
        Resource::Stats => Response::new(200, "application/json", Cow::Owned(live.json().to_vec())),
        Resource::MqttJs => Response {
            // A year: the URL the page uses names the version.
            cache_control: "public, max-age=31536000, immutable",
            ..Response::new(200, "text/javascript; charset=utf-8", Cow::Borrowed(MQTT_JS))
        },
    };
    response.head_only = head_only;
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ws::handshake::PAGE;

    /// The version of `vendor/mqtt.min.js`; the page asks for
    /// `/.ws/mqtt.min.js?v=` it, so that a new version is a new URL to caches.
    const MQTT_JS_VERSION: &str = "5.16.0";

    #[test]
    fn paths_with_or_without_a_query() {
        assert_eq!(resource("/.stats"), Some(Resource::Stats));
        assert_eq!(resource("/.stats?x=1"), Some(Resource::Stats));
        assert_eq!(resource("/.ws/mqtt.min.js?v=5.16.0"), Some(Resource::MqttJs));
        assert_eq!(resource("/.stats/more"), None);
        assert_eq!(resource("/metrics"), None, "the admin port's metrics are not here");
    }

    #[test]
    fn the_page_asks_for_the_vendored_version() {
        let wanted = format!("{MQTT_JS_PATH}?v={MQTT_JS_VERSION}");
        assert!(PAGE.contains(&wanted), "page.html must load {wanted}");
        let readme = include_str!("vendor/README.md");
        assert!(readme.contains(&format!("**version {MQTT_JS_VERSION}**")), "vendor/README.md");
        assert!(PAGE.contains(&format!("fetch(\"{STATS_PATH}\"")), "page.html reads {STATS_PATH}");
    }

    #[test]
    fn the_script_may_be_cached_and_the_figures_not() {
        let live = Live::new(false);
        let script = response(Resource::MqttJs, false, &live);
        let head = String::from_utf8(script.head()).unwrap();
        assert!(head.contains("Cache-Control: public, max-age=31536000, immutable\r\n"), "{head}");
        assert!(script.body.len() > 100_000 && matches!(script.body, Cow::Borrowed(_)), "not copied");
        let stats = response(Resource::Stats, true, &live);
        let wire = String::from_utf8(stats.to_bytes()).unwrap();
        assert!(wire.contains("Cache-Control: no-store\r\n") && wire.ends_with("\r\n\r\n"), "{wire}");
        assert!(wire.contains("Content-Type: application/json\r\n"));
    }
}
