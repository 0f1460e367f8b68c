//! A model of Xen's PV MMU hypercalls for host tests.
