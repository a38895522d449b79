"""target-catena-messages: a Singer target that delivers TMS driver messages through Catena."""
