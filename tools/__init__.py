"""Developer and operator scripts the Makefile calls (outside the package: bin_counter never imports them)."""
