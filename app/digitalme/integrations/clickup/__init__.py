"""ClickUp: task events recorded as the owner's activity, and a task-creating tool."""
