"""Dashboard templates, their W&B workspace rendering and the offline HTML report."""
