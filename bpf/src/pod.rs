//! Byte views of the skeleton's record types, for ring-buffer samples and
//! map keys and values.

use std::mem::MaybeUninit;

/// Copies a plain-old-data record out of a ring-buffer sample.
pub(crate) fn read_pod<T: Copy>(data: &[u8]) -> Option<T> {
    if data.len() < std::mem::size_of::<T>() {
        return None;
    }
    let mut raw = MaybeUninit::<T>::uninit();
    // SAFETY: only used with #[repr(C)] skeleton types generated from the BPF
    // object's BTF (integers and byte arrays, valid for any bit pattern), and
    // `data` holds at least size_of::<T>() bytes.
    unsafe {
        std::ptr::copy_nonoverlapping(
            data.as_ptr(),
            raw.as_mut_ptr().cast::<u8>(),
            std::mem::size_of::<T>(),
        );
        Some(raw.assume_init())
    }
}

pub(crate) fn pod_bytes<T: Copy>(v: &T) -> &[u8] {
    // SAFETY: only used with #[repr(C)] skeleton types made of integers and
    // byte arrays, whose every byte is initialised.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>()) }
}
