//! Our bindings to Envoy 1.40's dynamic-module ABI for HTTP filters (ABI `v0.2.0`): the only
//! module of this crate with `unsafe` code.
//!
//! Every declaration was checked against Envoy 1.40's `abi.h` and against the pinned binary: the
//! end-to-end test `envoy/e2e/test_native.py` checks that every callback `libfirebreak.so` needs
//! is exported by the binary (Envoy loads it with `RTLD_NOW`) and that every hook Envoy requires
//! is exported by the library, then runs each hook and callback through real Envoy. A wrong signature is silent undefined behaviour, so:
//! - C enums are `u32` here, never Rust enums (Envoy could send a value we do not know);
//! - a `bool` is C's `_Bool` (one byte, as Rust's);
//! - buffers are `(pointer, length)` pairs, never NUL-terminated, passed by value (16 bytes).
//!
//! Ownership and lifetime (from the ABI's rules): what Envoy hands us (hook arguments, header and
//! body slices, attribute values) is valid only until the hook returns or until a callback changes
//! that object, so everything is copied at once, except a body's slices, which are lent to one
//! reader for one call ([`Stream::with_body`]); what we hand Envoy is copied by Envoy before the
//! callback returns. A filter's pointer is used only on its worker, inside one of its hooks: the
//! safe [`Stream`] type borrows the hook's lifetime.
//!
//! Every exported hook catches a panic (none crosses the FFI boundary) and fails the stream
//! closed: a request refused with `500 filter_failed`.

use std::ffi::{c_char, c_void};
use std::marker::PhantomData;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use crate::filter::{self, Config, HookResult, NativeFilter};

type ConfigEnvoyPtr = *mut c_void;
type ConfigModulePtr = *const c_void;
type FilterEnvoyPtr = *mut c_void;
type FilterModulePtr = *const c_void;

/// Bytes Envoy owns (`envoy_dynamic_module_type_envoy_buffer`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct EnvoyBuffer {
    ptr: *const c_char,
    length: usize,
}

/// Bytes we own, lent to Envoy for one call (`envoy_dynamic_module_type_module_buffer`).
#[repr(C)]
#[derive(Clone, Copy)]
struct ModuleBuffer {
    ptr: *const c_char,
    length: usize,
}

/// `envoy_dynamic_module_type_envoy_http_header`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct EnvoyHttpHeader {
    key_ptr: *const c_char,
    key_length: usize,
    value_ptr: *const c_char,
    value_length: usize,
}

/// `envoy_dynamic_module_type_module_http_header`.
#[repr(C)]
struct ModuleHttpHeader {
    key_ptr: *const c_char,
    key_length: usize,
    value_ptr: *const c_char,
    value_length: usize,
}

fn lend(bytes: &[u8]) -> ModuleBuffer {
    ModuleBuffer { ptr: bytes.as_ptr().cast(), length: bytes.len() }
}

const ABSENT: ModuleBuffer = ModuleBuffer { ptr: std::ptr::null(), length: 0 };

/// Which header map (`envoy_dynamic_module_type_http_header_type`).
#[derive(Debug, Clone, Copy)]
pub enum HeaderMap {
    RequestHeaders = 0,
    RequestTrailers = 1,
    ResponseHeaders = 2,
}

/// Which body (`envoy_dynamic_module_type_http_body_type`).
#[derive(Debug, Clone, Copy)]
pub enum Body {
    ReceivedRequest = 0,
    BufferedRequest = 1,
    ReceivedResponse = 2,
    BufferedResponse = 3,
}

/// `envoy_dynamic_module_type_attribute_id` values we read.
pub const ATTRIBUTE_RESPONSE_CODE_DETAILS: u32 = 16;
pub const ATTRIBUTE_SOURCE_ADDRESS: u32 = 24;

/// `envoy_dynamic_module_type_log_level`.
pub const LOG_DEBUG: u32 = 1;
pub const LOG_INFO: u32 = 2;
pub const LOG_WARN: u32 = 3;
pub const LOG_ERROR: u32 = 4;
pub const LOG_CRITICAL: u32 = 5;

/// Header statuses (`..._request_headers_status`, `..._response_headers_status`).
pub const HEADERS_CONTINUE: u32 = 0;
pub const HEADERS_STOP_ITERATION: u32 = 1;
/// Body statuses (`..._request_body_status`, `..._response_body_status`).
pub const BODY_CONTINUE: u32 = 0;
pub const BODY_STOP_AND_BUFFER: u32 = 1;
pub const BODY_STOP_NO_BUFFER: u32 = 3;
/// Trailer statuses.
pub const TRAILERS_CONTINUE: u32 = 0;
pub const TRAILERS_STOP: u32 = 1;

/// `envoy_dynamic_module_type_http_callout_init_result::Success`.
const CALLOUT_INIT_SUCCESS: u32 = 0;
/// `envoy_dynamic_module_type_http_callout_result::Success`.
const CALLOUT_SUCCESS: u32 = 0;
/// `envoy_dynamic_module_type_metrics_result::Success`.
const METRICS_SUCCESS: u32 = 0;

extern "C" {
    fn envoy_dynamic_module_callback_log(level: u32, message: ModuleBuffer);
    fn envoy_dynamic_module_callback_log_enabled(level: u32) -> bool;

    fn envoy_dynamic_module_callback_http_get_headers_size(filter: FilterEnvoyPtr, header_type: u32) -> usize;
    fn envoy_dynamic_module_callback_http_get_headers(
        filter: FilterEnvoyPtr,
        header_type: u32,
        result: *mut EnvoyHttpHeader,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_set_header(
        filter: FilterEnvoyPtr,
        header_type: u32,
        key: ModuleBuffer,
        value: ModuleBuffer,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_add_header(
        filter: FilterEnvoyPtr,
        header_type: u32,
        key: ModuleBuffer,
        value: ModuleBuffer,
    ) -> bool;

    fn envoy_dynamic_module_callback_http_send_response(
        filter: FilterEnvoyPtr,
        status_code: u32,
        headers: *mut ModuleHttpHeader,
        headers_size: usize,
        body: ModuleBuffer,
        details: ModuleBuffer,
    );

    fn envoy_dynamic_module_callback_http_get_body_size(filter: FilterEnvoyPtr, body_type: u32) -> usize;
    fn envoy_dynamic_module_callback_http_get_body_chunks_size(filter: FilterEnvoyPtr, body_type: u32) -> usize;
    fn envoy_dynamic_module_callback_http_get_body_chunks(
        filter: FilterEnvoyPtr,
        body_type: u32,
        result: *mut EnvoyBuffer,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_received_buffered_request_body(filter: FilterEnvoyPtr) -> bool;
    fn envoy_dynamic_module_callback_http_received_buffered_response_body(filter: FilterEnvoyPtr) -> bool;

    fn envoy_dynamic_module_callback_http_filter_continue_decoding(filter: FilterEnvoyPtr);
    fn envoy_dynamic_module_callback_http_filter_continue_encoding(filter: FilterEnvoyPtr);

    fn envoy_dynamic_module_callback_http_filter_http_callout(
        filter: FilterEnvoyPtr,
        callout_id_out: *mut u64,
        cluster_name: ModuleBuffer,
        headers: *mut ModuleHttpHeader,
        headers_size: usize,
        body: ModuleBuffer,
        timeout_milliseconds: u64,
    ) -> u32;

    fn envoy_dynamic_module_callback_http_filter_get_attribute_string(
        filter: FilterEnvoyPtr,
        attribute_id: u32,
        result: *mut EnvoyBuffer,
    ) -> bool;

    fn envoy_dynamic_module_callback_http_set_filter_state_bytes(
        filter: FilterEnvoyPtr,
        key: ModuleBuffer,
        value: ModuleBuffer,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_get_filter_state_bytes(
        filter: FilterEnvoyPtr,
        key: ModuleBuffer,
        result: *mut EnvoyBuffer,
    ) -> bool;

    fn envoy_dynamic_module_callback_http_filter_config_define_counter(
        config: ConfigEnvoyPtr,
        name: ModuleBuffer,
        label_names: *mut ModuleBuffer,
        label_names_length: usize,
        counter_id: *mut usize,
    ) -> u32;
    fn envoy_dynamic_module_callback_http_filter_increment_counter(
        filter: FilterEnvoyPtr,
        id: usize,
        label_values: *mut ModuleBuffer,
        label_values_length: usize,
        value: u64,
    ) -> u32;

    // Gauges (the fill levels of the local tables): the same shapes as the counters' in 1.40's
    // abi.h (`envoy_dynamic_module_type_metrics_result` return; the id 1-based, per config).
    fn envoy_dynamic_module_callback_http_filter_config_define_gauge(
        config: ConfigEnvoyPtr,
        name: ModuleBuffer,
        label_names: *mut ModuleBuffer,
        label_names_length: usize,
        gauge_id: *mut usize,
    ) -> u32;
    fn envoy_dynamic_module_callback_http_filter_config_set_gauge(
        config: ConfigEnvoyPtr,
        id: usize,
        label_values: *mut ModuleBuffer,
        label_values_length: usize,
        value: u64,
    ) -> u32;
    fn envoy_dynamic_module_callback_http_filter_set_gauge(
        filter: FilterEnvoyPtr,
        id: usize,
        label_values: *mut ModuleBuffer,
        label_values_length: usize,
        value: u64,
    ) -> u32;
}

/// Copies `length` bytes Envoy owns.
fn copy(ptr: *const c_char, length: usize) -> Vec<u8> {
    if ptr.is_null() || length == 0 {
        return Vec::new();
    }
    // SAFETY: Envoy gave `ptr` and `length` for one buffer it keeps valid until the current hook
    // returns; we are inside that hook and copy the bytes at once. Non-null was checked above.
    unsafe { std::slice::from_raw_parts(ptr.cast::<u8>(), length) }.to_vec()
}

/// Borrows `length` bytes Envoy owns, for the rest of the current hook.
fn borrow<'hook>(ptr: *const c_char, length: usize) -> &'hook [u8] {
    if ptr.is_null() || length == 0 {
        return &[];
    }
    // SAFETY: Envoy gave `ptr` and `length` for one buffer it keeps valid until the current hook
    // returns; callers use the slice only inside that hook (they copy what they keep). Non-null
    // was checked above.
    unsafe { std::slice::from_raw_parts(ptr.cast::<u8>(), length) }
}

/// Names lower-cased (Envoy's already are: one allocation for the name, one for the value).
fn copy_headers(headers: &[EnvoyHttpHeader]) -> Vec<(String, Vec<u8>)> {
    headers
        .iter()
        .map(|h| (header_name(borrow(h.key_ptr, h.key_length)), copy(h.value_ptr, h.value_length)))
        .collect()
}

/// A header name as a lower-case `String` (a byte that is not UTF-8 becomes U+FFFD, as before).
fn header_name(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(name) if !name.bytes().any(|b| b.is_ascii_uppercase()) => name.to_owned(),
        Ok(name) => name.to_ascii_lowercase(),
        Err(_) => String::from_utf8_lossy(bytes).to_ascii_lowercase(),
    }
}

/// A line in Envoy's log (`dynamic_modules` logger), from any thread.
pub fn log(level: u32, message: &str) {
    // SAFETY: the message is a live borrow for the whole call; Envoy copies it before returning.
    unsafe { envoy_dynamic_module_callback_log(level, lend(message.as_bytes())) }
}

/// Whether Envoy writes lines at `level`.
pub fn log_enabled(level: u32) -> bool {
    // SAFETY: takes a plain integer; callable from any thread.
    unsafe { envoy_dynamic_module_callback_log_enabled(level) }
}

/// A filter configuration during `config_new` (the only time counters can be defined).
pub struct ConfigEnvoy<'hook> {
    ptr: ConfigEnvoyPtr,
    hook: PhantomData<&'hook ()>,
}

impl ConfigEnvoy<'_> {
    /// Defines a counter; its id, or `None` if Envoy refused.
    pub fn define_counter(&self, name: &str) -> Option<usize> {
        let mut id: usize = 0;
        // SAFETY: `ptr` is the config Envoy is creating (we are inside config_new); the name is
        // borrowed for the call and copied by Envoy; `id` is a live local Envoy writes once.
        let result = unsafe {
            envoy_dynamic_module_callback_http_filter_config_define_counter(
                self.ptr,
                lend(name.as_bytes()),
                std::ptr::null_mut(),
                0,
                &mut id,
            )
        };
        (result == METRICS_SUCCESS && id != 0).then_some(id)
    }

    /// Defines a gauge (no labels); its id, or `None` if Envoy refused.
    pub fn define_gauge(&self, name: &str) -> Option<usize> {
        let mut id: usize = 0;
        // SAFETY: as for define_counter: inside config_new, the name borrowed for the call and
        // copied by Envoy, `id` a live local Envoy writes once.
        let result = unsafe {
            envoy_dynamic_module_callback_http_filter_config_define_gauge(
                self.ptr,
                lend(name.as_bytes()),
                std::ptr::null_mut(),
                0,
                &mut id,
            )
        };
        (result == METRICS_SUCCESS && id != 0).then_some(id)
    }

    /// Sets a gauge this configuration defined (its first value, during config_new).
    pub fn set_gauge(&self, id: usize, value: u64) {
        // SAFETY: `ptr` is the config Envoy is creating (we are inside config_new, on the main
        // thread); `id` came from define_gauge of this config; no labels (null, 0).
        let _ =
            unsafe { envoy_dynamic_module_callback_http_filter_config_set_gauge(self.ptr, id, std::ptr::null_mut(), 0, value) };
    }
}

/// One stream's filter in Envoy, during one hook.
pub struct Stream<'hook> {
    ptr: FilterEnvoyPtr,
    hook: PhantomData<&'hook ()>,
}

/// A callout's answer, copied out of `http_callout_done`.
pub struct CalloutAnswer {
    pub id: u64,
    pub succeeded: bool,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
}

impl Stream<'_> {
    pub fn headers(&self, map: HeaderMap) -> Option<Vec<(String, Vec<u8>)>> {
        // SAFETY: `ptr` is this hook's filter, used on its worker during the hook.
        let size = unsafe { envoy_dynamic_module_callback_http_get_headers_size(self.ptr, map as u32) };
        let empty = EnvoyHttpHeader { key_ptr: std::ptr::null(), key_length: 0, value_ptr: std::ptr::null(), value_length: 0 };
        let mut headers = vec![empty; size];
        if size == 0 {
            return Some(Vec::new());
        }
        // SAFETY: `headers` has exactly `size` entries, the count Envoy just gave for this map in
        // this hook; Envoy fills them with pointers valid until the hook returns (copied below).
        let ok = unsafe { envoy_dynamic_module_callback_http_get_headers(self.ptr, map as u32, headers.as_mut_ptr()) };
        ok.then(|| copy_headers(&headers))
    }

    /// Sets (`Some`) or removes (`None`) a header: the ABI removes on an absent value.
    pub fn set_header(&self, map: HeaderMap, name: &str, value: Option<&str>) -> bool {
        let value = value.map(|v| lend(v.as_bytes())).unwrap_or(ABSENT);
        // SAFETY: this hook's filter on its worker; both buffers are live borrows Envoy copies.
        unsafe { envoy_dynamic_module_callback_http_set_header(self.ptr, map as u32, lend(name.as_bytes()), value) }
    }

    pub fn add_header(&self, map: HeaderMap, name: &str, value: &str) -> bool {
        // SAFETY: this hook's filter on its worker; both buffers are live borrows Envoy copies.
        unsafe {
            envoy_dynamic_module_callback_http_add_header(self.ptr, map as u32, lend(name.as_bytes()), lend(value.as_bytes()))
        }
    }

    /// A local reply; `details` becomes the response code details.
    pub fn send_response(&self, status: u16, headers: &[(String, String)], body: &[u8], details: &str) {
        let mut vector: Vec<ModuleHttpHeader> = headers
            .iter()
            .map(|(n, v)| ModuleHttpHeader {
                key_ptr: n.as_ptr().cast(),
                key_length: n.len(),
                value_ptr: v.as_ptr().cast(),
                value_length: v.len(),
            })
            .collect();
        // SAFETY: this hook's filter on its worker; the header vector, the body and the details
        // are live borrows for the call and Envoy copies them.
        unsafe {
            envoy_dynamic_module_callback_http_send_response(
                self.ptr,
                u32::from(status),
                vector.as_mut_ptr(),
                vector.len(),
                lend(body),
                lend(details.as_bytes()),
            )
        }
    }

    /// Envoy's slices of one body, appended to `into` (`false`: Envoy did not give them).
    fn slices(&self, body: Body, into: &mut Vec<EnvoyBuffer>) -> bool {
        // SAFETY: this hook's filter on its worker.
        let count = unsafe { envoy_dynamic_module_callback_http_get_body_chunks_size(self.ptr, body as u32) };
        if count == 0 {
            return true;
        }
        let start = into.len();
        into.resize(start.saturating_add(count), EnvoyBuffer { ptr: std::ptr::null(), length: 0 });
        let Some(room) = into.get_mut(start..) else { return false };
        // SAFETY: `room` has exactly the `count` entries Envoy just reported for this body in
        // this hook; Envoy writes that many slices, valid until the hook returns or the body
        // changes (see `with_body`).
        unsafe { envoy_dynamic_module_callback_http_get_body_chunks(self.ptr, body as u32, room.as_mut_ptr()) }
    }

    fn kinds(response: bool) -> (Body, Body) {
        if response {
            (Body::BufferedResponse, Body::ReceivedResponse)
        } else {
            (Body::BufferedRequest, Body::ReceivedRequest)
        }
    }

    /// Whether this body hook's chunk is not yet in the buffer (it counts besides it).
    fn received_apart(&self, response: bool, in_body_hook: bool) -> bool {
        if !in_body_hook {
            return false;
        }
        // SAFETY: this hook's filter on its worker.
        let same = unsafe {
            if response {
                envoy_dynamic_module_callback_http_received_buffered_response_body(self.ptr)
            } else {
                envoy_dynamic_module_callback_http_received_buffered_request_body(self.ptr)
            }
        };
        !same
    }

    /// Lends the request (or response) body so far, at most `size` bytes, to `visit` as Envoy's
    /// own slices, not copied: what was buffered, then the chunk of this body hook unless Envoy
    /// already counts it in the buffer. `None`: Envoy did not give the slices.
    ///
    /// Invariant: Envoy keeps the slices valid until the hook returns or until the body buffer
    /// changes. `visit` gets them for its call only (the slice lifetimes end with it), and it
    /// must not call into Envoy for this stream meanwhile (no continue, local reply or body
    /// write): the one caller, `NativeHost::with_request_body`, hands them to core code that holds
    /// the host mutably borrowed, so it cannot reach the stream while it reads them.
    pub fn with_body<T>(&self, response: bool, in_body_hook: bool, size: usize, visit: impl FnOnce(&[&[u8]]) -> T) -> Option<T> {
        let (buffered, received) = Self::kinds(response);
        let mut slices = Vec::new();
        if !self.slices(buffered, &mut slices) {
            return None;
        }
        if self.received_apart(response, in_body_hook) && !self.slices(received, &mut slices) {
            return None;
        }
        let mut left = size;
        let mut chunks: Vec<&[u8]> = Vec::with_capacity(slices.len());
        for slice in &slices {
            if left == 0 {
                break;
            }
            let chunk = borrow(slice.ptr, slice.length.min(left));
            left = left.saturating_sub(chunk.len());
            chunks.push(chunk);
        }
        Some(visit(&chunks))
    }

    /// The request (or response) body so far (see [`Stream::with_body`]), copied; empty when
    /// Envoy does not give it.
    pub fn body(&self, response: bool, in_body_hook: bool, size: usize) -> Vec<u8> {
        self.with_body(response, in_body_hook, size, |chunks| chunks.concat()).unwrap_or_default()
    }

    /// The size of [`Stream::body`], without copying it.
    pub fn body_size(&self, response: bool, in_body_hook: bool) -> usize {
        let (buffered, received) = Self::kinds(response);
        // SAFETY: this hook's filter on its worker.
        let mut size = unsafe { envoy_dynamic_module_callback_http_get_body_size(self.ptr, buffered as u32) };
        if self.received_apart(response, in_body_hook) {
            // SAFETY: this hook's filter on its worker, inside its body hook.
            size = size.saturating_add(unsafe { envoy_dynamic_module_callback_http_get_body_size(self.ptr, received as u32) });
        }
        size
    }

    pub fn continue_decoding(&self) {
        // SAFETY: this hook's filter on its worker (a later hook than the one that stopped).
        unsafe { envoy_dynamic_module_callback_http_filter_continue_decoding(self.ptr) }
    }

    pub fn continue_encoding(&self) {
        // SAFETY: this hook's filter on its worker (a later hook than the one that stopped).
        unsafe { envoy_dynamic_module_callback_http_filter_continue_encoding(self.ptr) }
    }

    /// Starts an HTTP callout; its id, or `None` if Envoy refused it.
    pub fn callout(&self, cluster: &str, headers: &[(&str, &str)], body: &[u8], timeout_ms: u64) -> Option<u64> {
        let mut vector: Vec<ModuleHttpHeader> = headers
            .iter()
            .map(|(n, v)| ModuleHttpHeader {
                key_ptr: n.as_ptr().cast(),
                key_length: n.len(),
                value_ptr: v.as_ptr().cast(),
                value_length: v.len(),
            })
            .collect();
        let mut id: u64 = 0;
        // SAFETY: this hook's filter on its worker; the cluster, headers and body are live
        // borrows Envoy copies; `id` is a live local Envoy writes.
        let result = unsafe {
            envoy_dynamic_module_callback_http_filter_http_callout(
                self.ptr,
                &mut id,
                lend(cluster.as_bytes()),
                vector.as_mut_ptr(),
                vector.len(),
                lend(body),
                timeout_ms,
            )
        };
        (result == CALLOUT_INIT_SUCCESS).then_some(id)
    }

    pub fn attribute_string(&self, id: u32) -> Option<String> {
        let mut result = EnvoyBuffer { ptr: std::ptr::null(), length: 0 };
        // SAFETY: this hook's filter on its worker; `result` is a live local Envoy writes with a
        // buffer valid until the hook returns (copied at once).
        let found = unsafe { envoy_dynamic_module_callback_http_filter_get_attribute_string(self.ptr, id, &mut result) };
        found.then(|| String::from_utf8_lossy(&copy(result.ptr, result.length)).into_owned())
    }

    pub fn set_filter_state(&self, key: &str, value: &[u8]) -> bool {
        // SAFETY: this hook's filter on its worker; both buffers are live borrows Envoy copies.
        unsafe { envoy_dynamic_module_callback_http_set_filter_state_bytes(self.ptr, lend(key.as_bytes()), lend(value)) }
    }

    pub fn filter_state(&self, key: &str) -> Option<Vec<u8>> {
        let mut result = EnvoyBuffer { ptr: std::ptr::null(), length: 0 };
        // SAFETY: this hook's filter on its worker; the key is a live borrow; `result` is a live
        // local Envoy writes with a buffer valid until the hook returns (copied at once).
        let found =
            unsafe { envoy_dynamic_module_callback_http_get_filter_state_bytes(self.ptr, lend(key.as_bytes()), &mut result) };
        found.then(|| copy(result.ptr, result.length))
    }

    pub fn set_gauge(&self, id: usize, value: u64) {
        // SAFETY: this hook's filter on its worker; `id` came from define_gauge of its config; no
        // labels (null, 0). Envoy's gauges are atomic: workers may set one concurrently.
        let _ = unsafe { envoy_dynamic_module_callback_http_filter_set_gauge(self.ptr, id, std::ptr::null_mut(), 0, value) };
    }

    pub fn increment_counter(&self, id: usize, value: u64) {
        // SAFETY: this hook's filter on its worker; `id` came from define_counter of its config.
        let _ =
            unsafe { envoy_dynamic_module_callback_http_filter_increment_counter(self.ptr, id, std::ptr::null_mut(), 0, value) };
    }
}

/// Runs a hook body; a panic becomes `on_panic`'s answer (the stream fails closed).
fn guarded<T>(hook: impl FnOnce() -> T, on_panic: impl FnOnce() -> T) -> T {
    match catch_unwind(AssertUnwindSafe(hook)) {
        Ok(value) => value,
        Err(_) => {
            log(LOG_CRITICAL, "firebreak native panic caught in a hook: the stream fails closed");
            on_panic()
        }
    }
}

/// The filter behind a module pointer we made in `filter_new`.
fn native_filter<'a>(module: FilterModulePtr) -> Option<&'a NativeFilter> {
    // SAFETY: `module` is null or the `Box<NativeFilter>` pointer `filter_new` returned, which
    // stays alive until `filter_destroy`; Envoy calls this filter's hooks only in between, on one
    // worker, and the filter's mutable state is behind a `RefCell` (a re-entered hook sees it
    // busy and does nothing), so a shared reference is sound.
    unsafe { module.cast::<NativeFilter>().as_ref() }
}

fn stream<'hook>(ptr: FilterEnvoyPtr) -> Stream<'hook> {
    Stream { ptr, hook: PhantomData }
}

/// Refuses the stream after a panic: `500 filter_failed`.
fn fail_closed(envoy: FilterEnvoyPtr) {
    guarded(|| filter::fail_closed(&stream(envoy)), || ());
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_on_program_init() -> *const c_char {
    c"v0.2.0".as_ptr()
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_on_http_filter_config_new(
    config_envoy: ConfigEnvoyPtr,
    name: EnvoyBuffer,
    config: EnvoyBuffer,
) -> ConfigModulePtr {
    let envoy = ConfigEnvoy { ptr: config_envoy, hook: PhantomData };
    let name = copy(name.ptr, name.length);
    let config = copy(config.ptr, config.length);
    guarded(
        || match filter::new_config(&envoy, &name, &config) {
            Some(config) => Box::into_raw(Box::new(config)).cast::<c_void>().cast_const(),
            None => std::ptr::null(),
        },
        std::ptr::null,
    )
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_on_http_filter_config_destroy(config: ConfigModulePtr) {
    if !config.is_null() {
        // SAFETY: `config` is the `Box<Arc<Config>>` pointer config_new returned; Envoy destroys
        // it once (the filters it made hold their own `Arc`).
        drop(unsafe { Box::from_raw(config.cast::<Arc<Config>>().cast_mut()) });
    }
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_on_http_filter_new(config: ConfigModulePtr, _envoy: FilterEnvoyPtr) -> FilterModulePtr {
    // SAFETY: `config` is the live `Box<Arc<Config>>` pointer config_new returned (Envoy creates
    // filters only from a live config); the reference does not outlive this call.
    let Some(config) = (unsafe { config.cast::<Arc<Config>>().as_ref() }) else { return std::ptr::null() };
    guarded(|| Box::into_raw(Box::new(NativeFilter::new(config))).cast::<c_void>().cast_const(), std::ptr::null)
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_on_http_filter_destroy(module: FilterModulePtr) {
    if !module.is_null() {
        // SAFETY: `module` is the `Box<NativeFilter>` pointer filter_new returned; Envoy destroys
        // it once, after every other hook of this filter has returned.
        drop(unsafe { Box::from_raw(module.cast::<NativeFilter>().cast_mut()) });
    }
}

fn on_hook(envoy: FilterEnvoyPtr, module: FilterModulePtr, event: filter::Hook, on_panic: u32) -> u32 {
    let Some(filter) = native_filter(module) else { return on_panic };
    let answer = guarded(|| filter.on_hook(&stream(envoy), event), || HookResult::Panicked);
    match answer {
        HookResult::Status(status) => status,
        HookResult::Panicked => {
            fail_closed(envoy);
            on_panic
        }
    }
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_on_http_filter_request_headers(
    envoy: FilterEnvoyPtr,
    module: FilterModulePtr,
    end_of_stream: bool,
) -> u32 {
    on_hook(envoy, module, filter::Hook::RequestHeaders { end_of_stream }, HEADERS_STOP_ITERATION)
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_on_http_filter_request_body(
    envoy: FilterEnvoyPtr,
    module: FilterModulePtr,
    end_of_stream: bool,
) -> u32 {
    on_hook(envoy, module, filter::Hook::RequestBody { end_of_stream }, BODY_STOP_NO_BUFFER)
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_on_http_filter_request_trailers(envoy: FilterEnvoyPtr, module: FilterModulePtr) -> u32 {
    on_hook(envoy, module, filter::Hook::RequestTrailers, TRAILERS_STOP)
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_on_http_filter_response_headers(
    envoy: FilterEnvoyPtr,
    module: FilterModulePtr,
    end_of_stream: bool,
) -> u32 {
    on_hook(envoy, module, filter::Hook::ResponseHeaders { end_of_stream }, HEADERS_STOP_ITERATION)
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_on_http_filter_response_body(
    envoy: FilterEnvoyPtr,
    module: FilterModulePtr,
    end_of_stream: bool,
) -> u32 {
    on_hook(envoy, module, filter::Hook::ResponseBody { end_of_stream }, BODY_STOP_NO_BUFFER)
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_on_http_filter_response_trailers(envoy: FilterEnvoyPtr, module: FilterModulePtr) -> u32 {
    on_hook(envoy, module, filter::Hook::ResponseTrailers, TRAILERS_STOP)
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_on_http_filter_stream_complete(envoy: FilterEnvoyPtr, module: FilterModulePtr) {
    let _ = on_hook(envoy, module, filter::Hook::StreamComplete, 0);
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_on_http_filter_http_callout_done(
    envoy: FilterEnvoyPtr,
    module: FilterModulePtr,
    callout_id: u64,
    result: u32,
    headers: *mut EnvoyHttpHeader,
    headers_size: usize,
    body_chunks: *mut EnvoyBuffer,
    body_chunks_size: usize,
) {
    let headers = if headers.is_null() {
        Vec::new()
    } else {
        // SAFETY: Envoy passes `headers_size` headers at `headers`, valid during this hook; they
        // are copied at once.
        copy_headers(unsafe { std::slice::from_raw_parts(headers, headers_size) })
    };
    let mut body = Vec::new();
    if !body_chunks.is_null() {
        // SAFETY: Envoy passes `body_chunks_size` slices at `body_chunks`, valid during this hook;
        // they are copied at once, each straight into the one answer buffer.
        let chunks = unsafe { std::slice::from_raw_parts(body_chunks, body_chunks_size) };
        body.reserve_exact(chunks.iter().map(|chunk| chunk.length).fold(0, usize::saturating_add));
        for chunk in chunks {
            body.extend_from_slice(borrow(chunk.ptr, chunk.length));
        }
    }
    let answer = CalloutAnswer { id: callout_id, succeeded: result == CALLOUT_SUCCESS, headers, body };
    let _ = on_hook(envoy, module, filter::Hook::CalloutDone(answer), 0);
}

// Hooks Envoy requires that Firebreak does not use: HTTP streams (we make one-shot callouts),
// the scheduler (no work leaves the worker), and the downstream watermarks.

#[no_mangle]
extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_headers(
    _envoy: FilterEnvoyPtr,
    _module: FilterModulePtr,
    _stream_id: u64,
    _headers: *mut EnvoyHttpHeader,
    _headers_size: usize,
    _end_stream: bool,
) {
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_data(
    _envoy: FilterEnvoyPtr,
    _module: FilterModulePtr,
    _stream_id: u64,
    _data: *const EnvoyBuffer,
    _data_count: usize,
    _end_stream: bool,
) {
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_trailers(
    _envoy: FilterEnvoyPtr,
    _module: FilterModulePtr,
    _stream_id: u64,
    _trailers: *mut EnvoyHttpHeader,
    _trailers_size: usize,
) {
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_complete(
    _envoy: FilterEnvoyPtr,
    _module: FilterModulePtr,
    _stream_id: u64,
) {
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_reset(
    _envoy: FilterEnvoyPtr,
    _module: FilterModulePtr,
    _stream_id: u64,
    _reason: u32,
) {
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_on_http_filter_scheduled(_envoy: FilterEnvoyPtr, _module: FilterModulePtr, _event_id: u64) {}

#[no_mangle]
extern "C" fn envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark(
    _envoy: FilterEnvoyPtr,
    _module: FilterModulePtr,
) {
}

#[no_mangle]
extern "C" fn envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark(
    _envoy: FilterEnvoyPtr,
    _module: FilterModulePtr,
) {
}
