"""Who may call the gateway and what each call cost."""
