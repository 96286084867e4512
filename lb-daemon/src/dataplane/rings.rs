//! The ring array's allocator: every service keeps two windows of the shared array, the
//! live one the data path reads and an idle one the next ring change is written into.

use std::collections::BTreeMap;

use super::{DataplaneError, Result};

/// A window of the shared ring array.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Window {
    pub(super) offset: u32,
    pub(super) size: u32,
}

/// First-fit allocator over the ring array; services keep two windows each.
#[derive(Debug)]
pub(super) struct RingSpace {
    pub(super) capacity: u32,
    /// Free windows by offset, coalesced.
    pub(super) free: BTreeMap<u32, u32>,
}

impl RingSpace {
    pub(super) fn new(capacity: u32) -> Self {
        RingSpace { capacity, free: BTreeMap::from([(0, capacity)]) }
    }

    pub(super) fn alloc(&mut self, size: u32) -> Result<Window> {
        if size == 0 {
            return Ok(Window { offset: 0, size: 0 });
        }
        let found = self.free.iter().find(|(_, len)| **len >= size).map(|(o, l)| (*o, *l));
        let Some((offset, len)) = found else {
            let free = self.free.values().sum();
            return Err(DataplaneError::RingSpace { size, capacity: self.capacity, free });
        };
        self.free.remove(&offset);
        if len > size {
            self.free.insert(offset + size, len - size);
        }
        Ok(Window { offset, size })
    }

    /// Marks `w` as taken (an adopted service's live ring).
    pub(super) fn reserve(&mut self, w: Window) -> Result<()> {
        if w.size == 0 {
            return Ok(());
        }
        let found = self.free.range(..=w.offset).next_back().map(|(o, l)| (*o, *l));
        match found {
            Some((o, l)) if o + l >= w.offset + w.size => {
                self.free.remove(&o);
                if w.offset > o {
                    self.free.insert(o, w.offset - o);
                }
                if o + l > w.offset + w.size {
                    self.free.insert(w.offset + w.size, o + l - w.offset - w.size);
                }
                Ok(())
            }
            _ => Err(DataplaneError::RingSpace {
                size: w.size,
                capacity: self.capacity,
                free: self.free.values().sum(),
            }),
        }
    }

    pub(super) fn release(&mut self, w: Window) {
        if w.size == 0 {
            return;
        }
        let mut offset = w.offset;
        let mut size = w.size;
        if let Some((&o, &l)) = self.free.range(..offset).next_back()
            && o + l == offset
        {
            self.free.remove(&o);
            offset = o;
            size += l;
        }
        if let Some(&l) = self.free.get(&(w.offset + w.size)) {
            self.free.remove(&(w.offset + w.size));
            size += l;
        }
        self.free.insert(offset, size);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_space_allocates_and_coalesces() {
        let mut s = RingSpace::new(100);
        let a = s.alloc(30).unwrap();
        let b = s.alloc(30).unwrap();
        let c = s.alloc(30).unwrap();
        assert_eq!((a.offset, b.offset, c.offset), (0, 30, 60));
        assert!(matches!(s.alloc(11), Err(DataplaneError::RingSpace { free: 10, .. })));
        s.release(b);
        s.release(a);
        assert_eq!(s.alloc(60).unwrap().offset, 0, "freed neighbours merge");
        s.release(c);
        s.release(Window { offset: 0, size: 60 });
        assert_eq!(s.free, BTreeMap::from([(0, 100)]));
    }
}
