"""Built-in EdgeRazor plugins: the paper's formulas, registered through the public hooks."""
