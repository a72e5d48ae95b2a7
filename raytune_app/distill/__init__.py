"""Distilling Step-by-Step: a teacher writes rationales and labels; the student learns both tasks."""
