//! What the `consume-observed` case switches on for its run only: a metrics recorder and
//! logs at INFO (formatted into a sink), as a service that scrapes metrics would run.
//!
//! Both are installed once for the whole suite and stay off for the other cases: the
//! recorder hands out no-op handles while off (slim-bus registers its handles when a
//! listener starts), and the log filter is reloaded between WARN and INFO.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use metrics_util::debugging::DebuggingRecorder;
use tracing_subscriber::{EnvFilter, Registry, reload};

static ON: AtomicBool = AtomicBool::new(false);
static FILTER: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// A recorder that records only while [`ON`].
struct Switched(DebuggingRecorder);

impl Recorder for Switched {
    fn describe_counter(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.0.describe_counter(key, unit, description);
    }

    fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.0.describe_gauge(key, unit, description);
    }

    fn describe_histogram(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.0.describe_histogram(key, unit, description);
    }

    fn register_counter(&self, key: &Key, metadata: &Metadata<'_>) -> Counter {
        if ON.load(Ordering::Acquire) {
            self.0.register_counter(key, metadata)
        } else {
            Counter::noop()
        }
    }

    fn register_gauge(&self, key: &Key, metadata: &Metadata<'_>) -> Gauge {
        if ON.load(Ordering::Acquire) {
            self.0.register_gauge(key, metadata)
        } else {
            Gauge::noop()
        }
    }

    fn register_histogram(&self, key: &Key, metadata: &Metadata<'_>) -> Histogram {
        if ON.load(Ordering::Acquire) {
            self.0.register_histogram(key, metadata)
        } else {
            Histogram::noop()
        }
    }
}

/// Installs the switched recorder; the suite's subscriber hands its reload handle to
/// [`set_filter_handle`].
pub(crate) fn install_recorder() {
    let _ = metrics::set_global_recorder(Switched(DebuggingRecorder::new()));
}

pub(crate) fn set_filter_handle(handle: reload::Handle<EnvFilter, Registry>) {
    let _ = FILTER.set(handle);
}

/// The recorder and INFO logs are on while this lives.
pub(crate) struct Observed;

impl Observed {
    pub(crate) fn start() -> Self {
        ON.store(true, Ordering::Release);
        set_filter("info");
        Observed
    }
}

impl Drop for Observed {
    fn drop(&mut self) {
        ON.store(false, Ordering::Release);
        set_filter("warn");
    }
}

fn set_filter(directives: &str) {
    if let Some(handle) = FILTER.get() {
        let _ = handle.reload(EnvFilter::new(directives));
    }
}
