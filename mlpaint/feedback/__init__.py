"""What people answered on the page: the feedback store (`store`), the checks every record
passes before training reads it (`checks`), and live accuracy and drift computed from it
(`monitoring`)."""
