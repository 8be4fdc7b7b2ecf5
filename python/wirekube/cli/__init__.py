"""Command-line tools: wirekubectl."""
