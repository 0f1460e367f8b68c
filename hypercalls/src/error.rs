//! Xen's error numbers (xen/include/public/errno.h) as a named type.

use core::fmt;

/// A negative return value of a hypercall, by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XenError {
    Perm,
    NoEnt,
    Srch,
    Intr,
    Io,
    NxIo,
    TooBig,
    NoExec,
    BadF,
    Again,
    NoMem,
    Acces,
    Fault,
    Busy,
    Exist,
    XDev,
    NoDev,
    Inval,
    NoSpc,
    Range,
    DeadLk,
    NoSys,
    Overflow,
    Restart,
    OpNotSupp,
    /// An error number this table does not name.
    Other(i64),
}

impl XenError {
    /// Map a hypercall's negative return value to its name.
    pub const fn from_errno(ret: i64) -> XenError {
        match -ret {
            1 => XenError::Perm,
            2 => XenError::NoEnt,
            3 => XenError::Srch,
            4 => XenError::Intr,
            5 => XenError::Io,
            6 => XenError::NxIo,
            7 => XenError::TooBig,
            8 => XenError::NoExec,
            9 => XenError::BadF,
            11 => XenError::Again,
            12 => XenError::NoMem,
            13 => XenError::Acces,
            14 => XenError::Fault,
            16 => XenError::Busy,
            17 => XenError::Exist,
            18 => XenError::XDev,
            19 => XenError::NoDev,
            22 => XenError::Inval,
            28 => XenError::NoSpc,
            34 => XenError::Range,
            35 => XenError::DeadLk,
            38 => XenError::NoSys,
            75 => XenError::Overflow,
            85 => XenError::Restart,
            95 => XenError::OpNotSupp,
            _ => XenError::Other(ret),
        }
    }

    /// The negative value Xen returns for this error.
    pub const fn errno(self) -> i64 {
        -(match self {
            XenError::Perm => 1,
            XenError::NoEnt => 2,
            XenError::Srch => 3,
            XenError::Intr => 4,
            XenError::Io => 5,
            XenError::NxIo => 6,
            XenError::TooBig => 7,
            XenError::NoExec => 8,
            XenError::BadF => 9,
            XenError::Again => 11,
            XenError::NoMem => 12,
            XenError::Acces => 13,
            XenError::Fault => 14,
            XenError::Busy => 16,
            XenError::Exist => 17,
            XenError::XDev => 18,
            XenError::NoDev => 19,
            XenError::Inval => 22,
            XenError::NoSpc => 28,
            XenError::Range => 34,
            XenError::DeadLk => 35,
            XenError::NoSys => 38,
            XenError::Overflow => 75,
            XenError::Restart => 85,
            XenError::OpNotSupp => 95,
            XenError::Other(ret) => return ret,
        })
    }

    /// `Ok(ret)` for a non-negative return value, the named error otherwise.
    pub const fn check(ret: i64) -> Result<i64, XenError> {
        if ret < 0 {
            Err(XenError::from_errno(ret))
        } else {
            Ok(ret)
        }
    }

    /// The C name of the error (`EINVAL`, ...).
    pub const fn name(self) -> &'static str {
        match self {
            XenError::Perm => "EPERM",
            XenError::NoEnt => "ENOENT",
            XenError::Srch => "ESRCH",
            XenError::Intr => "EINTR",
            XenError::Io => "EIO",
            XenError::NxIo => "ENXIO",
            XenError::TooBig => "E2BIG",
            XenError::NoExec => "ENOEXEC",
            XenError::BadF => "EBADF",
            XenError::Again => "EAGAIN",
            XenError::NoMem => "ENOMEM",
            XenError::Acces => "EACCES",
            XenError::Fault => "EFAULT",
            XenError::Busy => "EBUSY",
            XenError::Exist => "EEXIST",
            XenError::XDev => "EXDEV",
            XenError::NoDev => "ENODEV",
            XenError::Inval => "EINVAL",
            XenError::NoSpc => "ENOSPC",
            XenError::Range => "ERANGE",
            XenError::DeadLk => "EDEADLK",
            XenError::NoSys => "ENOSYS",
            XenError::Overflow => "EOVERFLOW",
            XenError::Restart => "ERESTART",
            XenError::OpNotSupp => "EOPNOTSUPP",
            XenError::Other(_) => "E?",
        }
    }
}

/// How far a partly failed `mmu_update`/`mmuext_op` got: `done` requests took effect, the one at
/// index `done` failed with `error`, and none after it ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PartialFailure {
    pub done: u32,
    pub error: XenError,
}

impl fmt::Display for XenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "-{} ({})", self.name(), self.errno())
    }
}

#[cfg(test)]
mod tests {
    use super::XenError;

    #[test]
    fn errno_round_trips_for_every_named_error() {
        for e in 1..=120 {
            let err = XenError::from_errno(-e);
            assert_eq!(err.errno(), -e, "{err:?}");
        }
        assert_eq!(XenError::from_errno(-22), XenError::Inval);
        assert_eq!(XenError::from_errno(-16).name(), "EBUSY");
        assert_eq!(XenError::check(3), Ok(3));
        assert_eq!(XenError::check(-1), Err(XenError::Perm));
    }
}
