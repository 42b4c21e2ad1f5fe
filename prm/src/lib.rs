//! mlx5 PRM byte layouts shared by the emulator and the driver.
//!
//! Everything the device and driver exchange is big-endian; the endianness lives in the
//! field types (`zerocopy::byteorder::{U16, U32, U64}<BigEndian>`). Wire structs hold
//! integers only; enumerated fields become enums through `TryFrom`, and an unknown value
//! is a [`PrmError`]. No I/O happens here.
//!
//! Sources: `shared/reference/mlx5-device.md` §2–3 and `kernel-mlx5vf.md` §4.
#![deny(missing_docs)]

/// Declares a fieldless wire enum with `TryFrom<repr>` (typed error naming the field),
/// `From<Self> for repr`, a `name()` giving the PRM/kernel name and an `ALL` table.
macro_rules! wire_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident: $repr:ident, field = $field:literal {
            $( $(#[$vmeta:meta])* $variant:ident = $value:literal => $text:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr($repr)]
        pub enum $name {
            $( $(#[$vmeta])* $variant = $value, )+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The PRM / kernel name of this value.
            pub const fn name(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }
        }

        impl TryFrom<$repr> for $name {
            type Error = $crate::PrmError;

            fn try_from(value: $repr) -> Result<Self, Self::Error> {
                match value {
                    $($value => Ok($name::$variant),)+
                    _ => Err($crate::PrmError::UnknownValue {
                        field: $field,
                        value: u32::from(value),
                    }),
                }
            }
        }

        impl From<$name> for $repr {
            fn from(value: $name) -> $repr {
                value as $repr
            }
        }

        impl core::fmt::Display for $name {
            fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                write!(f, "{}({:#x})", self.name(), *self as $repr)
            }
        }
    };
}

pub mod cmd;
pub mod cmdq;
pub mod errno;
pub mod error;
pub mod ifc;
pub mod iseg;
pub mod migration_stream;
pub mod state_image;
pub mod wqe;

pub use cmd::{CmdInHeader, CmdOutHeader, CmdStatus, Opcode};
pub use cmdq::{CmdLayout, CmdProtBlock, DeliveryStatus};
pub use error::PrmError;
pub use ifc::{Field, IfcError};
pub use iseg::{HealthBuffer, NicInterface};
