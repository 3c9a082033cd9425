//! The filters by name: each one's configuration parsed, validated and bound into a
//! [`FlowFactory`] that makes its flow per stream. Every host configures filters through here: the
//! separate proxy-wasm modules, the chain module (one section per stage), the native tests.

use std::rc::Rc;

use crate::envguard::flow::GuardFactory;
use crate::envguard::GuardPolicy;
use crate::flow::FlowFactory;
use crate::replay::flow::ReplayFactory;
use crate::replay::ReplayPolicy;
use crate::store::SharedStore;
use crate::ConfigError;

/// What a filter's configuration may need besides its JSON.
pub struct Setup<'a> {
    /// Environment variables given to the plugin (keys from `secret_env`).
    pub env: &'a dyn Fn(&str) -> Option<String>,
    /// The plugin's shared data (its tables are bound at configure time).
    pub store: &'a dyn SharedStore,
    /// 32 random bytes: a new table's placement secret.
    pub entropy: [u8; 32],
}

/// Configures `filter` from its JSON configuration. An error names the field, from the filter's
/// own configuration down (the chain puts its section in front, [`ConfigError::under`]).
pub fn configure(filter: &str, json: &[u8], setup: &Setup<'_>) -> Result<Rc<dyn FlowFactory>, ConfigError> {
    match filter {
        "env_guard" => Ok(Rc::new(GuardFactory { policy: Rc::new(GuardPolicy::from_json(json)?) })),
        "replay_guard" => {
            let mut policy = ReplayPolicy::from_json(json)?;
            policy.bind_tables(setup.store, setup.entropy)?;
            Ok(Rc::new(ReplayFactory::new(policy, setup.entropy)))
        }
        other => Err(ConfigError::new("", format!("unknown filter `{other}`"))),
    }
}
