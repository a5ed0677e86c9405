//! Log output: `tracing` events to standard error, as text or JSON lines.

use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::FilterFn;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{LogConfig, LogFormat};

/// Installs the global subscriber with the configured filter (`RUST_LOG`
/// reaches it through the configuration's environment layer, so that
/// `--print-config` shows the filter in effect and `--log-level` wins).
pub fn init(config: &LogConfig) {
    let directives = config.level.as_str();
    let filter = EnvFilter::builder().parse_lossy(quiet_router(directives));
    let spans = router_spans(directives.contains("rumqttd"));
    // A log line that cannot be written is dropped: tracing-subscriber
    // would otherwise report it with `eprintln!`, which panics when
    // standard error is a broken pipe (a worker whose supervisor is gone,
    // `crate::supervisor`), and the panic would end the process mid-drain.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .log_internal_errors(false);
    match config.format {
        LogFormat::Text => builder.finish().with(spans).init(),
        LogFormat::Json => {
            builder.json().flatten_event(true).with_current_span(false).finish().with(spans).init()
        }
    }
}

/// rumqttd 0.20 logs every connect, subscribe and disconnect at `info`;
/// with thousands of clients that drowns the server's own lines (which are
/// never per connection at `info`). Our patch moved those, and everything
/// else one client can cause, to `debug`; this keeps whatever `info` lines
/// remain in the crate (or a future patch forgets) out as well: unless a
/// filter names rumqttd itself, its messages start at `warn`.
fn quiet_router(directives: &str) -> String {
    if directives.contains("rumqttd") { directives.to_owned() } else { format!("{directives},rumqttd=warn") }
}

/// rumqttd's router opens `error`-level spans for every packet it handles,
/// one with the topic formatted into it for every publish: at `warn` and
/// below they are live, and creating them took about a tenth of the router
/// thread's time with 1,000 MQTT clients at full speed (perf). Unless a
/// filter names rumqttd, its spans are turned off at their call sites; its
/// warnings and errors still log, without that span context.
fn router_spans(asked_for: bool) -> FilterFn {
    fn keep(meta: &tracing::Metadata<'_>) -> bool {
        !(meta.is_span() && meta.target().starts_with("rumqttd"))
    }
    fn all(_: &tracing::Metadata<'_>) -> bool {
        true
    }
    FilterFn::new(if asked_for { all } else { keep })
}

/// Routes panics through the log as well, naming the thread, so that a
/// panic in the MQTT router (fatal) or in one client's task (that client
/// only) shows up in JSON log pipelines, not only on raw stderr.
pub fn log_panics() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("unnamed");
        tracing::error!(thread = name, panic = %info, "panic");
        previous(info);
    }));
}

#[cfg(test)]
mod tests {
    #[test]
    fn router_chatter_is_quiet_unless_asked_for() {
        assert_eq!(super::quiet_router("info"), "info,rumqttd=warn");
        assert_eq!(super::quiet_router("debug,rumqttd=info"), "debug,rumqttd=info");
    }

    #[test]
    fn router_spans_are_off_but_its_warnings_are_not() {
        use tracing_subscriber::layer::SubscriberExt;
        let quiet = tracing_subscriber::registry().with(super::router_spans(false));
        tracing::subscriber::with_default(quiet, || {
            assert!(tracing::error_span!(target: "rumqttd::router::routing", "publish").is_disabled());
            assert!(tracing::enabled!(target: "rumqttd::router::routing", tracing::Level::WARN));
            assert!(!tracing::error_span!(target: "echo_server::mqtt", "session").is_disabled());
        });
        let asked = tracing_subscriber::registry().with(super::router_spans(true));
        tracing::subscriber::with_default(asked, || {
            assert!(!tracing::error_span!(target: "rumqttd::router::routing", "publish").is_disabled());
        });
    }
}
