"""The model: ThreeTowers, its objective and losses, and the factory from configs."""
