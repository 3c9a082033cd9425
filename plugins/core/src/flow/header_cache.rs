//! A host's copy of the request headers during one callback: read from the host once and shared
//! by every stage of a chain, and kept in step with the flows' own writes (a stage that sets or
//! removes a header, e.g. the verified principal) instead of being read again after each write.
//! A write is applied to the copy only where the result is exactly what Envoy's map then holds,
//! and only while no flow still holds the copy; otherwise the next read goes to the host.

use std::rc::Rc;

use super::{lossy_headers, utf8_headers, Headers, HostFailed, RawHeaders, ReadError};

#[derive(Debug, Default)]
pub struct RequestHeaderCache {
    utf8: Option<Rc<Headers>>,
    lossy: Option<Rc<Headers>>,
    /// Writes made since the copies were read, lower-case names (`None`: removed).
    writes: Vec<(String, Option<String>)>,
}

impl RequestHeaderCache {
    /// The headers, all UTF-8 (`read` asks the host when there is no usable copy).
    pub fn utf8(&mut self, read: impl FnOnce() -> Result<RawHeaders, HostFailed>) -> Result<Rc<Headers>, ReadError> {
        self.settle();
        if let Some(headers) = &self.utf8 {
            return Ok(headers.clone());
        }
        let headers = Rc::new(utf8_headers(read().map_err(|_| ReadError::HostFailed)?)?);
        self.utf8 = Some(headers.clone());
        Ok(headers)
    }

    /// The headers with a value that is not UTF-8 kept as empty. Headers that are all UTF-8 are
    /// their own lossy form: one read serves both.
    pub fn lossy(&mut self, read: impl FnOnce() -> Result<RawHeaders, HostFailed>) -> Result<Rc<Headers>, HostFailed> {
        self.settle();
        if let Some(headers) = self.utf8.as_ref().or(self.lossy.as_ref()) {
            return Ok(headers.clone());
        }
        let headers = Rc::new(lossy_headers(read()?));
        self.lossy = Some(headers.clone());
        Ok(headers)
    }

    /// The host set (`Some`) or removed (`None`) `name`.
    pub fn wrote(&mut self, name: &str, value: Option<&str>) {
        if self.utf8.is_some() || self.lossy.is_some() {
            self.writes.push((name.to_ascii_lowercase(), value.map(str::to_string)));
        }
    }

    /// Applies the pending writes to each copy no flow holds any more, exactly as Envoy did to its
    /// map; a copy that is still held, or a write this cannot mirror exactly, drops the copy.
    fn settle(&mut self) {
        if self.writes.is_empty() {
            return;
        }
        let writes = std::mem::take(&mut self.writes);
        for copy in [&mut self.utf8, &mut self.lossy] {
            let kept = copy.as_mut().and_then(Rc::get_mut).is_some_and(|headers| writes.iter().all(|w| apply(headers, w)));
            if !kept {
                *copy = None;
            }
        }
    }
}

/// One write as Envoy's header map takes it: a removal drops every value of the name; a set of a
/// name present once replaces its value, of an absent name appends it. A set of a name present
/// more than once is left to the host (`false`: read the map again).
fn apply(headers: &mut Headers, (name, value): &(String, Option<String>)) -> bool {
    match value {
        None => {
            headers.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
            true
        }
        Some(value) => {
            let mut present = headers.iter_mut().filter(|(n, _)| n.eq_ignore_ascii_case(name));
            match (present.next(), present.next()) {
                (None, _) => {
                    headers.push((name.clone(), value.clone()));
                    true
                }
                (Some(entry), None) => {
                    entry.1.clone_from(value);
                    true
                }
                (Some(_), Some(_)) => false,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(pairs: &[(&str, &[u8])]) -> RawHeaders {
        pairs.iter().map(|(n, v)| (n.to_string(), v.to_vec())).collect()
    }

    #[test]
    fn a_write_is_applied_to_the_copy_instead_of_reading_again() {
        let mut cache = RequestHeaderCache::default();
        let mut reads = 0;
        let first = cache
            .utf8(|| Ok(raw(&[(":path", b"/a"), ("x-p", b"old"), ("x-gone", b"1"), ("x-gone", b"2")])))
            .unwrap();
        drop(first);
        cache.wrote("X-P", Some("new"));
        cache.wrote("x-gone", None);
        cache.wrote("x-added", Some("v"));
        let after = cache
            .utf8(|| {
                reads += 1;
                Ok(Vec::new())
            })
            .unwrap();
        assert_eq!(reads, 0);
        let expected: Headers = [(":path", "/a"), ("x-p", "new"), ("x-added", "v")]
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect();
        assert_eq!(*after, expected);
        assert_eq!(*cache.lossy(|| Ok(Vec::new())).unwrap(), expected);
    }

    #[test]
    fn a_copy_still_held_or_a_duplicate_set_is_read_again() {
        let fresh = || Ok(raw(&[("x-d", b"from-host")]));
        let mut cache = RequestHeaderCache::default();
        let held = cache.utf8(|| Ok(raw(&[("x-d", b"1")]))).unwrap();
        cache.wrote("x-d", Some("2"));
        assert_eq!(cache.utf8(fresh).unwrap()[0].1, "from-host");
        assert_eq!(held[0].1, "1", "a flow's copy never changes under it");

        let mut cache = RequestHeaderCache::default();
        drop(cache.utf8(|| Ok(raw(&[("x-d", b"1"), ("x-d", b"2")]))).unwrap());
        cache.wrote("x-d", Some("3"));
        assert_eq!(cache.utf8(fresh).unwrap()[0].1, "from-host");
    }
}
