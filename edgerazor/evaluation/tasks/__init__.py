"""lm-eval task configs of the offline tasks (gsm8k, humaneval, wikitext) and the functions they name."""
