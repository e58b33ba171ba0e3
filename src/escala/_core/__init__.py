"""One run: plan, scheduler, drivers, adaptive limits, progress."""
