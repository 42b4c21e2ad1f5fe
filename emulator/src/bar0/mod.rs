//! BAR0: the initialization segment and the MSI-X table and PBA.
