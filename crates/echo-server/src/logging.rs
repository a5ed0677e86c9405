//! Log output: `tracing` events to standard error, as text or JSON lines.

use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Installs the global subscriber. `RUST_LOG`, when set, wins over the
/// configured level so that one run can be made verbose without editing files.
pub fn init(config: &LogConfig) {
    let directives = match std::env::var("RUST_LOG") {
        Ok(value) if !value.trim().is_empty() => value,
        _ => config.level.clone(),
    };
    let filter = EnvFilter::builder().parse_lossy(quiet_router(&directives));
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(false);
    match config.format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).init(),
    }
}

/// rumqttd's router logs every connect, subscribe and disconnect at `info`;
/// with thousands of clients that drowns the server's own lines (which are
/// never per connection at `info`). Unless a filter names rumqttd itself,
/// its messages start at `warn`.
fn quiet_router(directives: &str) -> String {
    if directives.contains("rumqttd") { directives.to_owned() } else { format!("{directives},rumqttd=warn") }
}

/// Routes panics through the log as well, naming the thread, so that a
/// panic in the MQTT router thread (fatal) or in one client's task (that
/// client only) shows up in JSON log pipelines, not only on raw stderr.
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
}
