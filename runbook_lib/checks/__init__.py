"""Every check, defined once (one id, one title, one implementation), and the one mechanism that runs them."""
