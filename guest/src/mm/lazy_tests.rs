//! Host tests of the lazy-MMU core against the model.
