//! A body as the host holds it: its chunks, in order, lent to a reader for one call
//! ([`super::Host::with_request_body`]), so that a reader that streams over the bytes (a hash) never
//! needs them copied into one buffer. Envoy keeps a buffered body as a list of slices; the
//! dynamic-module ABI lends them as they are, proxy-wasm copies them into one buffer (one chunk).
//!
//! Readers that need the bytes contiguous (JSON, decoders, the credential detector's whole-value
//! checks) ask for [`BodyChunks::contiguous`]: borrowed when the body is one chunk (the common
//! case), copied once into one buffer only when it is several, so a value split across chunk
//! boundaries is seen whole.

use std::borrow::Cow;

/// A body's chunks, borrowed for one call. Empty chunks are skipped.
#[derive(Debug, Clone, Copy, Default)]
pub struct BodyChunks<'a> {
    /// A first chunk (a body handed as one slice has only this).
    head: &'a [u8],
    /// The chunks after it.
    tail: &'a [&'a [u8]],
}

impl<'a> BodyChunks<'a> {
    /// A body of several chunks, in order.
    pub fn new(chunks: &'a [&'a [u8]]) -> Self {
        BodyChunks { head: &[], tail: chunks }
    }

    /// The chunks in order, empty ones skipped.
    pub fn iter(&self) -> impl Iterator<Item = &'a [u8]> + 'a {
        std::iter::once(self.head).chain(self.tail.iter().copied()).filter(|chunk| !chunk.is_empty())
    }

    /// The body's size in bytes.
    pub fn len(&self) -> usize {
        self.iter().map(<[u8]>::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.iter().next().is_none()
    }

    /// The body as one slice: borrowed when it is at most one chunk, else copied once.
    pub fn contiguous(&self) -> Cow<'a, [u8]> {
        let mut chunks = self.iter();
        match (chunks.next(), chunks.next()) {
            (None, _) => Cow::Borrowed(&[]),
            (Some(only), None) => Cow::Borrowed(only),
            (Some(_), Some(_)) => Cow::Owned(self.to_vec()),
        }
    }

    /// The body copied into one buffer.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(self.len());
        for chunk in self.iter() {
            bytes.extend_from_slice(chunk);
        }
        bytes
    }
}

/// A body that is one slice.
impl<'a, T: AsRef<[u8]> + ?Sized> From<&'a T> for BodyChunks<'a> {
    fn from(body: &'a T) -> Self {
        BodyChunks { head: body.as_ref(), tail: &[] }
    }
}

/// Lends `chunks`, cut after `size` bytes in all, to `visit` (for hosts: the chunks are
/// borrowed, only the list of them is built).
pub fn lend<'a>(chunks: impl IntoIterator<Item = &'a [u8]>, size: usize, visit: &mut dyn FnMut(BodyChunks<'_>)) {
    let mut left = size;
    let mut cut: Vec<&[u8]> = Vec::new();
    for chunk in chunks {
        if left == 0 {
            break;
        }
        let taken = chunk.get(..left.min(chunk.len())).unwrap_or_default();
        left -= taken.len();
        cut.push(taken);
    }
    match cut.as_slice() {
        [only] => visit(BodyChunks::from(*only)),
        more => visit(BodyChunks::new(more)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lent(chunks: &[&[u8]], size: usize) -> (Vec<Vec<u8>>, Vec<u8>, bool) {
        let mut seen = None;
        lend(chunks.iter().copied(), size, &mut |body| {
            let borrowed = matches!(body.contiguous(), Cow::Borrowed(_));
            seen = Some((body.iter().map(<[u8]>::to_vec).collect(), body.contiguous().into_owned(), borrowed));
        });
        seen.unwrap()
    }

    #[test]
    fn chunks_are_cut_at_the_size_and_joined_only_when_several() {
        assert_eq!(lent(&[b"abc", b"def"], 100), (vec![b"abc".to_vec(), b"def".to_vec()], b"abcdef".to_vec(), false));
        assert_eq!(lent(&[b"abc", b"def"], 4), (vec![b"abc".to_vec(), b"d".to_vec()], b"abcd".to_vec(), false));
        assert_eq!(lent(&[b"abc", b"def"], 3), (vec![b"abc".to_vec()], b"abc".to_vec(), true));
        assert_eq!(lent(&[b"abc", b"def"], 0), (vec![], vec![], true));
        assert_eq!(lent(&[b"", b"abc", b""], 10), (vec![b"abc".to_vec()], b"abc".to_vec(), true));
        assert_eq!(lent(&[], 10), (vec![], vec![], true));
    }

    #[test]
    fn length_and_emptiness_count_every_chunk() {
        let chunks: [&[u8]; 3] = [b"ab", b"", b"cde"];
        let body = BodyChunks::new(&chunks);
        assert_eq!((body.len(), body.is_empty(), body.to_vec()), (5, false, b"abcde".to_vec()));
        assert!(BodyChunks::new(&[b"", b""]).is_empty());
        assert_eq!(BodyChunks::from(b"xyz").len(), 3);
    }
}
