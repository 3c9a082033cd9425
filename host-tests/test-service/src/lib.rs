//! `firebreak-test-service`: a root-only proxy-wasm module (no HTTP context), for the host's timer
//! and log tests. Plugin configuration (a JSON object, read by substring to stay tiny):
//! - `"tick_ms": N`      → tick every N ms;
//! - `"retick_ms": M`    → on the first tick, change the period to M ms;
//! - `"stop_after": K`   → after the K-th tick, set the period to 0 (no more ticks).
//!
//! It logs (info) `test-service: started`, `test-service: configured tick_ms=N`, and on every
//! tick `test-service: tick K at +T ms` (T: the host's clock since `on_configure`), and counts
//! ticks in the counter `test_service.ticks`.

use proxy_wasm::traits::{Context, RootContext};
use proxy_wasm::types::{LogLevel, MetricType};
use std::time::{Duration, UNIX_EPOCH};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(Service { started_ms: 0, ticks: 0, retick_ms: None, stop_after: None, counter: None })
    });
}}

struct Service {
    started_ms: u128,
    ticks: u64,
    retick_ms: Option<u64>,
    stop_after: Option<u64>,
    counter: Option<u32>,
}

fn log(message: &str) {
    let _ = proxy_wasm::hostcalls::log(LogLevel::Info, message);
}

fn number_after(config: &str, key: &str) -> Option<u64> {
    let rest = config.split(key).nth(1)?.trim_start();
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}

impl Service {
    fn now_ms(&self) -> u128 {
        self.get_current_time().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0)
    }
}

impl Context for Service {}

impl RootContext for Service {
    fn on_vm_start(&mut self, _size: usize) -> bool {
        log("test-service: started");
        true
    }

    fn on_configure(&mut self, _size: usize) -> bool {
        let config = self
            .get_plugin_configuration()
            .map(|c| String::from_utf8_lossy(&c).into_owned())
            .unwrap_or_default();
        self.started_ms = self.now_ms();
        self.retick_ms = number_after(&config, "\"retick_ms\":");
        self.stop_after = number_after(&config, "\"stop_after\":");
        self.counter = proxy_wasm::hostcalls::define_metric(MetricType::Counter, "test_service.ticks").ok();
        let tick_ms = number_after(&config, "\"tick_ms\":").unwrap_or(0);
        log(&format!("test-service: configured tick_ms={tick_ms}"));
        if tick_ms > 0 {
            self.set_tick_period(Duration::from_millis(tick_ms));
        }
        true
    }

    fn on_tick(&mut self) {
        self.ticks += 1;
        let elapsed = self.now_ms().saturating_sub(self.started_ms);
        log(&format!("test-service: tick {} at +{elapsed} ms", self.ticks));
        if let Some(id) = self.counter {
            let _ = proxy_wasm::hostcalls::increment_metric(id, 1);
        }
        if self.ticks == 1 {
            if let Some(ms) = self.retick_ms {
                self.set_tick_period(Duration::from_millis(ms));
            }
        }
        if self.stop_after == Some(self.ticks) {
            self.set_tick_period(Duration::ZERO);
        }
    }
}

