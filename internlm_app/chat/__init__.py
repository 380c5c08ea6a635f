"""What a conversation sends to a backend beyond plain text: attached files, tools and their runner, the model's
view of a stored chat."""
