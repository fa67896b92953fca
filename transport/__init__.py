"""One-sided point-to-point transfer engine with TransferEngine semantics (see DESIGN.md)."""
