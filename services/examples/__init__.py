"""Small runnable client examples."""
