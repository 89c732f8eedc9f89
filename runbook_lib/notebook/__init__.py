"""The notebook glue: the step context, the confirmation gate, rendering (HTML and terminal), progress."""
