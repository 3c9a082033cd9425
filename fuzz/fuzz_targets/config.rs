//! Configuration of each filter (`core::filters::configure`) and of the chain
//! (`core::filters::configure_chain`) from arbitrary JSON.
//!
//! Properties: never panics; an error names a well-formed field path (`a.b[0].c`, or the whole
//! document when it is not JSON of the right shape), under `filters[<i>].<filter>` for a chain
//! stage; a chain error names a stage that exists in the input; configuring is deterministic
//! (the same JSON configures, or fails on the same field, twice).
#![no_main]

use firebreak_core::filters::{configure, configure_chain, Setup, FILTERS};
use firebreak_core::store::MemoryStore;
use firebreak_fuzz::{demo_env, well_formed_field};
use libfuzzer_sys::fuzz_target;

fn field_of(filter: Option<&str>, json: &[u8]) -> Option<String> {
    let store = MemoryStore::default();
    let setup = Setup { env: &demo_env, store: &store, entropy: [7; 32] };
    match filter {
        Some(filter) => configure(filter, json, &setup).err().map(|e| e.field),
        None => configure_chain(json, &setup).err().map(|e| e.field),
    }
}

fuzz_target!(|data: &[u8]| {
    // The first byte picks the filter (or the chain); the rest is the configuration.
    let Some((&which, json)) = data.split_first() else { return };
    let filter = FILTERS.get(usize::from(which) % (FILTERS.len() + 1)).copied();
    let first = field_of(filter, json);
    if let Some(field) = &first {
        // The chain names an unknown top-level key as written.
        let top_level_key = filter.is_none()
            && serde_json::from_slice::<serde_json::Value>(json)
                .ok()
                .and_then(|v| v.as_object().map(|o| o.contains_key(field.as_str())))
                .unwrap_or(false);
        assert!(top_level_key || well_formed_field(field), "ill-formed field path {field:?}");
        // (An unknown top-level key is named as written, whatever it looks like: `filters[[[`.)
        if filter.is_none() && !top_level_key && field.starts_with("filters[") {
            let index: usize = field["filters[".len()..].split(']').next().and_then(|i| i.parse().ok()).expect("an index");
            let value: serde_json::Value = serde_json::from_slice(json).expect("a stage error comes from a JSON document");
            assert!(index < value["filters"].as_array().map_or(0, Vec::len), "{field} names no stage");
        }
    }
    assert_eq!(first, field_of(filter, json), "configuring twice gave different answers");
});
